"""Gradients kept as ATen kernels inside a compiled CPU training step.

Inductor decomposes and fuses everything it compiles, including two gradients it does
badly on CPU: the column sum that is a linear layer's bias gradient (fused into slower
kernels) and the scatter-add that is an embedding's weight gradient (contended on a small
vocabulary). Each becomes an op of its own (`torch.library.custom_op`), which inductor
calls instead of decomposing. `BiasGradLinear` also computes its product as a plain matmul
whose bias the next fused kernel adds (ATen's CPU `addmm` first copies the broadcast bias
into its output). Applied only with `--train.compile` on CPU; tested against `nn.Linear`
and `nn.Embedding` in value and gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BiasGradLinear(nn.Linear):
    """`nn.Linear` whose bias is added apart and whose bias gradient is ATen's column sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return F.linear(x, self.weight)
        y = F.linear(x, self.weight)
        return _AddBias.apply(y, self.bias.to(y.dtype))


class _AddBias(torch.autograd.Function):
    @staticmethod
    def forward(y, bias):
        return y + bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, bias_grad(grad.flatten(0, -2)) if ctx.needs_input_grad[1] else None


@torch.library.custom_op("ling::bias_grad", mutates_args=())
def bias_grad(grad: torch.Tensor) -> torch.Tensor:
    """The column sum of a 2-D gradient, as an op inductor calls rather than fuses."""
    return grad.sum(0)


@bias_grad.register_fake
def _(grad):
    return grad.new_empty(grad.shape[-1])


class ATenGradEmbedding(nn.Embedding):
    """`nn.Embedding` whose weight gradient is ATen's `embedding_dense_backward`."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.weight.requires_grad:
            return super().forward(ids)
        return _EmbeddingWithATenGrad.apply(ids, self.weight)


class _EmbeddingWithATenGrad(torch.autograd.Function):
    @staticmethod
    def forward(ids, weight):
        return F.embedding(ids, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ids, weight = inputs
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        return None, embedding_weight_grad(grad, ids, ctx.num_weights)


@torch.library.custom_op("ling::embedding_weight_grad", mutates_args=())
def embedding_weight_grad(grad: torch.Tensor, ids: torch.Tensor, num_weights: int) -> torch.Tensor:
    """An embedding table's gradient, as an op inductor calls rather than decomposes."""
    return torch.ops.aten.embedding_dense_backward(grad, ids, num_weights, -1, False)


@embedding_weight_grad.register_fake
def _(grad, ids, num_weights):
    return grad.new_empty(num_weights, grad.shape[-1])
