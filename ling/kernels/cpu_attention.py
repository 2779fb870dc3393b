"""Attention written as batched matmuls, for the CPU cases where SDPA's kernels are slow.

- `explicit_attention` (training and prefill): softmax(q kᵀ/√d + mask) v as two batched
  matmuls with the scale and mask fused into the first (`baddbmm`). PyTorch's fused CPU
  SDPA kernels upcast bf16 internally; on some CPUs these two matmuls are much faster for a
  training step. With the plain causal mask, the first half of the queries only looks at
  the first half of the keys, so the halves are computed apart (the masked quarter skipped).
- `single_query_attention` (decoding): one query per row over the cache, as two matmuls
  around a softmax; in a compiled decode step inductor fuses the scale, mask and softmax.

Both compute exactly what `Attention.attend` (SDPA) computes, up to float rounding, and
are tested against it in value and gradient. Which one runs is measured (`ling.kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ling.model import Attention


class ExplicitAttention(Attention):
    """`Attention` whose attention is `explicit_attention`."""

    def attend(self, q, k, v, mask, dropout: float) -> torch.Tensor:
        return explicit_attention(q, k, v, mask, dropout)


class SingleQueryAttention(Attention):
    """`Attention` that decodes (one query per row, with the cache's mask) by
    `single_query_attention`, and leaves everything else to SDPA."""

    def attend(self, q, k, v, mask, dropout: float) -> torch.Tensor:
        if q.shape[2] == 1 and mask is not None and mask.dtype == torch.bool:
            return single_query_attention(q, k, v, mask)
        return super().attend(q, k, v, mask, dropout)


def explicit_attention(q, k, v, mask=None, dropout: float = 0.0) -> torch.Tensor:
    """q (B, H, T, D) over k, v (B, H_kv, S, D); mask (B or 1, 1, T, S) bool, None = causal."""
    B, H, T, D = q.shape
    S = k.shape[2]
    if k.shape[1] != H:  # grouped key/value heads
        k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    k, v = k.reshape(B * H, S, D), v.reshape(B * H, S, D)
    if mask is None and T == S and T % 2 == 0:
        # Every operand its own dense tensor: a batched matmul copies an operand whose batches
        # are not packed back to back (a slice of the sequence), forward and backward.
        h = T // 2
        q_top, q_bottom = q.unflatten(2, (2, h)).permute(2, 0, 1, 3, 4).reshape(2, B * H, h, D)
        if torch.compiler.is_compiling():  # inductor fuses the slices' gradients into one kernel
            k_top, v_top = k[:, :h].contiguous(), v[:, :h].contiguous()
        else:
            k, k_top = _WithFirstRows.apply(k, h)
            v, v_top = _WithFirstRows.apply(v, h)
        top = _attend(q_top, k_top, v_top, None, dropout)
        bottom = _attend(q_bottom, k, v, None, dropout)
        halves = torch.stack([top, bottom])  # (2, B·H, h, D): its gradient's halves are dense too
        # to (B, T, H, D) memory, returned as the (B, H, T, D) view that the caller transposes back
        return halves.view(2, B, H, h, D).permute(1, 0, 3, 2, 4).reshape(B, T, H, D).transpose(1, 2)
    q = q.reshape(B * H, T, D)
    if mask is not None:
        mask = mask.view(T, S) if mask.shape[0] == 1 else mask.expand(B, H, T, S).reshape(B * H, T, S)
    return _attend(q, k, v, mask, dropout).view(B, H, T, D)


class _WithFirstRows(torch.autograd.Function):
    """(x, x[:, :n] as a dense copy) for x (N, S, D). The gradient is one pass over x's —
    the copy's added into its first rows — where a slice's backward fills a tensor of x's
    size with zeros, copies into it and adds it to x's gradient."""

    @staticmethod
    def forward(x, n):
        return x.view_as(x), x[:, :n].contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.n = inputs[1]

    @staticmethod
    def backward(ctx, grad, grad_first):
        n = ctx.n
        return torch.cat([grad[:, :n] + grad_first, grad[:, n:]], dim=1), None


def _attend(q, k, v, mask, dropout: float) -> torch.Tensor:
    """Attention of q (N, T, D) over k, v (N, S, D); mask (T, S) or (N, T, S), None = causal
    with the queries at the last T of the S positions."""
    T, S = q.shape[1], k.shape[1]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    bias = bias.expand(q.shape[0], T, S)  # a (T, S) bias broadcasts without a copy
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
    probs = scores.softmax(dim=-1)
    return torch.bmm(F.dropout(probs, dropout) if dropout > 0 else probs, v)


def single_query_attention(q, k, v, mask) -> torch.Tensor:
    """Attention of one query per row, q (B, H, 1, D), over k, v (B, H_kv, S, D) with a
    boolean mask (B, 1, 1, S). The query heads that share a key/value head (adjacent, as in
    SDPA's `enable_gqa`) are that head's rows, so grouped heads need no copy of the cache."""
    B, H, _, D = q.shape
    H_kv = k.shape[1]
    q = q.view(B, H_kv, H // H_kv, D)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs @ v).view(B, H, 1, D)
