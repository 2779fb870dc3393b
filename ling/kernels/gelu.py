"""GPT-2's tanh-approximated GELU as one fused loop, for training on CPU.

ATen computes the tanh form op by op, and its CPU `tanh` is slow. The same function
written with a sigmoid — 0.5·(1 + tanh z) = sigmoid(2z) — and compiled by inductor runs
as one loop for the forward and one for the backward (in fp32, rounded once). In an eager
step the function is compiled on its own (on first use: importing the compiler costs
commands that never train); inside a compiled model the formula is traced with the rest.
Tested against `F.gelu(approximate="tanh")` in value and gradient.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ling.model import MLP

_K = math.sqrt(8 / math.pi)  # 2·√(2/π): sigmoid(2z) with z = √(2/π)·(x + 0.044715·x³)


def gelu_tanh_as_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x * (_K + _K * 0.044715 * x * x))


@functools.cache
def compiled_gelu_tanh():
    return torch.compile(gelu_tanh_as_sigmoid, dynamic=True)


class FusedGeluMLP(MLP):
    """GPT-2's MLP with the GELU compiled on its own when it trains (an eager training step);
    ATen's without gradients, where a compiled call costs more than it saves."""

    def forward(self, x):
        h = self.up(x)
        return self.down(compiled_gelu_tanh()(h) if h.requires_grad else F.gelu(h, approximate="tanh"))


class SigmoidGeluMLP(MLP):
    """GPT-2's MLP with the GELU in its sigmoid form (for a model compiled as a whole)."""

    def forward(self, x):
        return self.down(gelu_tanh_as_sigmoid(self.up(x)))
