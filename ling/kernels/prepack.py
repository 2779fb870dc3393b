"""Linear layers with weights prepacked for oneDNN, for decoding on CPU.

Decoding one token per row multiplies a few activation rows by every weight matrix, so its
speed is how fast the weights stream from memory. Depending on the CPU, dtype and thread
count, PyTorch's default kernel for such a skinny matmul may run on one thread or a poorly
blocked path; the same product on weights reordered once into oneDNN's blocked layout can
be several times faster — or slower (benchmarks/bench_generate.py). So the engine times
both on each of the model's weight shapes and keeps the faster (`ling.kernels.inference`).
This is the reordering `torch.compile(freezing=True)` does on CPU, without the compile time.

The packed weight is an opaque oneDNN tensor: it is not a parameter, is not saved, and the
layer computes exactly `F.linear` up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def can_prepack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """oneDNN handles fp32 everywhere and bf16 where the CPU has native bf16 support."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PrepackedLinear(nn.Module):
    """`nn.Linear` inference twin whose weight lives in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
