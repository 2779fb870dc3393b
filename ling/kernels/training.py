"""Which kernels a training run uses: decided here, by the trainer, before it builds its step.

On CPU:
- attention: SDPA or `explicit_attention`, timed forward + backward on the run's micro-batch
  shape in its precision;
- GELU (GPT-2 MLPs): ATen's or the fused sigmoid form compiled on its own, timed the same
  way; inside a compiled model, the sigmoid form (inductor fuses it with its neighbours);
- with `--train.compile`: linear biases and embedding gradients as ATen ops (`grad_ops`).
On CUDA: SDPA's backend, timed among those that take the model's shapes.
`mode="reference"` changes nothing: the plain model trains.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ling.config import ModelConfig
from ling.kernels.cpu_attention import ExplicitAttention, explicit_attention
from ling.kernels.cuda_attention import BACKENDS, pinned_attention
from ling.kernels.gelu import FusedGeluMLP, SigmoidGeluMLP, compiled_gelu_tanh
from ling.kernels.grad_ops import ATenGradEmbedding, BiasGradLinear
from ling.kernels.probe import Probe
from ling.kernels.report import Choice, KernelReport, check_mode
from ling.kernels.swap import swap_class
from ling.model import MLP, Attention

PROBE_ROWS = 4
"""sequences of the micro-batch a probe times"""
ATTENTION, GELU, GRADIENTS = "attention (training)", "gelu (training)", "gradients (compiled)"


def plan_training_kernels(cfg: ModelConfig, *, mode: str, device: torch.device, precision: str, compile: bool,
                          micro_batch: int, seq_len: int, probe: Probe | None = None) -> KernelReport:
    """Decide, timing the candidates where there is a choice; nothing is changed yet."""
    report = KernelReport(check_mode(mode))
    if mode == "reference":
        return report
    probe = probe or Probe(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    # A few sequences tell which is faster per sequence: the probe stays short for big batches.
    rows = min(micro_batch, PROBE_ROWS)
    shape = (rows, cfg.n_head, cfg.n_kv_head, seq_len, cfg.head_dim)
    if device.type == "cpu":
        report.add(probe.pick(ATTENTION, _shape_key(shape, dtype, cfg.dropout), _attention_candidates(shape, dtype, device)))
        if cfg.mlp == "gelu":
            if compile:
                report.add(Choice(GELU, "sigmoid form", "rule"))
            else:
                x = (rows * seq_len, cfg.mlp_hidden)
                report.add(probe.pick(GELU, f"{x}|{dtype}", _gelu_candidates(x, dtype)))
        if compile:
            report.add(Choice(GRADIENTS, "ATen ops", "rule"))
    elif device.type == "cuda":
        report.add(probe.pick(ATTENTION, _shape_key(shape, dtype, cfg.dropout),
                              _cuda_attention_candidates(shape, dtype, device)))
    return report


def apply_training_kernels(model: nn.Module, report: KernelReport, device: torch.device) -> None:
    """Swap the kernels `report` picked into `model` (a Transformer, or a wrapper holding one)."""
    attention, gelu = report.picked(ATTENTION), report.picked(GELU)
    if device.type == "cpu" and attention == "explicit":
        swap_class(model, Attention, ExplicitAttention)
    elif device.type == "cuda" and attention not in (None, "default"):
        swap_class(model, Attention, pinned_attention(attention))
    if gelu == "fused":
        swap_class(model, MLP, FusedGeluMLP, where=lambda m: not m.swiglu)
    elif gelu == "sigmoid form":
        swap_class(model, MLP, SigmoidGeluMLP, where=lambda m: not m.swiglu)
    if report.picked(GRADIENTS) is not None:
        swap_class(model, nn.Linear, BiasGradLinear)
        swap_class(model, nn.Embedding, ATenGradEmbedding)


def _shape_key(shape, dtype, dropout) -> str:
    return f"B,H,Hkv,T,D={shape}|{dtype}|dropout={dropout > 0}"


def _qkv(shape, dtype, device):
    B, H, H_kv, T, D = shape
    g = torch.Generator(device=device).manual_seed(0)
    make = lambda heads: torch.randn(B, heads, T, D, generator=g, device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return make(H), make(H_kv), make(H_kv)


def _forward_backward(fn, *inputs):
    out = fn(*inputs)
    out.backward(torch.ones_like(out))
    for x in inputs:
        x.grad = None


def _attention_candidates(shape, dtype, device) -> dict:
    q, k, v = _qkv(shape, dtype, device)
    gqa = shape[1] != shape[2]
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # noqa: E731
    return {"sdpa": lambda: _forward_backward(sdpa, q, k, v),
            "explicit": lambda: _forward_backward(explicit_attention, q, k, v)}


def _gelu_candidates(rows, dtype) -> dict:
    x = torch.randn(rows, dtype=dtype).requires_grad_()
    aten = lambda t: F.gelu(t, approximate="tanh")  # noqa: E731
    return {"aten": lambda: _forward_backward(aten, x), "fused": lambda: _forward_backward(compiled_gelu_tanh(), x)}


def _cuda_attention_candidates(shape, dtype, device) -> dict:
    from torch.nn.attention import sdpa_kernel

    q, k, v = _qkv(shape, dtype, device)
    gqa = shape[1] != shape[2]

    def pinned(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return lambda: _forward_backward(run, q, k, v)

    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # noqa: E731
    return {"default": lambda: _forward_backward(sdpa, q, k, v), **{name: pinned(b) for name, b in BACKENDS.items()}}
