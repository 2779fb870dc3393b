"""A transformer layer for inference in fewer operations: what a decode step on CPU is made of.

Decoding one token per row on CPU spends as much time launching small operations as
computing: a narrow model's layer is some fifty ATen calls of a few microseconds each
besides its matmuls. `LeanBlock` computes exactly what `Block` computes (without dropout
and gradients) in about half as many calls:

- a linear layer and what follows it in one oneDNN call, where the weights are prepacked
  (`PrepackedLinear`): the residual add after the attention and MLP outputs, SiLU after
  the gate, the gate's product after the up projection, GELU after GPT-2's up projection;
- RMSNorm as one `layer_norm` over [x, −x] (whose mean is 0, so its variance is mean(x²)):
  one fused kernel instead of RMSNorm's six;
- RoPE with a fused multiply-add, and no module calls for dropout.

Attention itself stays the layer's own `attend` (SDPA or a kernel swapped in for it). The
engine times a decode step of one layer with and without it (`ling.kernels.inference`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ling.kernels.prepack import PrepackedLinear
from ling.model import Block, RMSNorm

_linear = torch.ops.mkldnn._linear_pointwise


class LeanRMSNorm(RMSNorm):
    """RMSNorm as a LayerNorm of [x, −x] with weight [w, w]: rms(x)² = mean(x²) = the variance
    of [x, −x], whose mean is zero; LayerNorm accumulates in fp32 as RMSNorm does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        weight = self.__dict__.get("_doubled")
        if weight is None or weight.dtype != x.dtype or weight.device != x.device:
            weight = torch.cat([self.weight, self.weight]).to(x.dtype).detach()
            self.__dict__["_doubled"] = weight  # not a parameter or buffer: outside the state dict
        return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * d,), weight, None, self.eps)[..., :d]


def linear_then(layer: nn.Module, x: torch.Tensor, attr: str = "none", algorithm: str = "") -> torch.Tensor:
    """layer(x) followed by an activation (`swish` = SiLU, `gelu` with `tanh`), fused where prepacked."""
    if isinstance(layer, PrepackedLinear):
        return _linear(x, layer.packed_weight, layer.bias, attr, [], algorithm)
    y = layer(x)
    if attr == "swish":
        return F.silu(y)
    if attr == "gelu":
        return F.gelu(y, approximate=algorithm or "none")
    return y


def linear_with(layer: nn.Module, x: torch.Tensor, other: torch.Tensor, op: str) -> torch.Tensor:
    """layer(x) + other (`op="add"`) or layer(x) · other (`"mul"`), fused where prepacked."""
    if isinstance(layer, PrepackedLinear):
        return _linear.binary(x, other, layer.packed_weight, layer.bias, op)
    y = layer(x)
    return y + other if op == "add" else y * other


class LeanBlock(Block):
    """`Block.forward` for inference (eval mode, no gradients) in fewer operations, for the
    one-token decode step it is chosen by timing; a prompt (several positions) takes `Block`'s
    path, where the fused epilogues measured slower."""

    def forward(self, x, rope, positions, mask, cache, layer):
        B, T, _ = x.shape
        if T > 1:
            return super().forward(x, rope, positions, mask, cache, layer)
        attn, mlp, cfg = self.attn, self.mlp, self.attn.cfg
        H, H_kv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv = attn.qkv(self.attn_norm(x)).view(B, T, H + 2 * H_kv, D)
        qk, v = qkv.split([H + H_kv, H_kv], dim=2)
        attention_dtype = qkv.dtype if cache is None else cache.dtype
        if cfg.qk_norm:
            qk = torch.cat([attn.q_norm(qk[:, :, :H]), attn.k_norm(qk[:, :, H:])], dim=2)
        if rope is not None:
            cos, sin = rope
            half = D // 2
            rotated = torch.cat([-qk[..., half:], qk[..., :half]], dim=-1)
            qk = torch.addcmul(qk * cos, rotated, sin)  # in fp32, as `apply_rope`
        q, k = qk.to(attention_dtype).transpose(1, 2).split([H, H_kv], dim=1)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, k, v, positions)
        y = attn.attend(q, k, v, mask, 0.0).transpose(1, 2).reshape(B, T, attn.q_size).to(qkv.dtype)
        x = linear_with(attn.o, y, x, "add")
        h = self.mlp_norm(x)
        if mlp.swiglu:
            hidden = linear_with(mlp.up, h, linear_then(mlp.gate, h, "swish"), "mul")
        else:
            hidden = linear_then(mlp.up, h, "gelu", "tanh")
        return linear_with(mlp.down, hidden, x, "add")
