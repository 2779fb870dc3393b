"""Whether compiling the decode step pays for a request.

`torch.compile` of the decode step (inductor, frozen weights) makes each step faster, but
compiling takes from seconds to minutes — more for deeper models, more on a cold cache —
so it pays only for requests with enough decode steps. Both sides are measured on the
machine at hand: every engine records its decode-step time, and a compiled engine its
compile time and compiled step time, per model shape, dtype and batch size (in
kernels.json, beside the kernel races; see `probe`). `decide` then compares the measured
saving over the request's steps with the measured compile time.

How to compile depends on the device (`how_to_compile`). On CPU: inductor with frozen
weights and its C++ wrapper, shapes dynamic (rows and cache slots in use change every
step). On CUDA a small model's decode step is mostly kernel launches, hundreds per token,
each costing more than its work; a CUDA graph replays them all as one launch, but only
for the shapes and memory addresses it was captured with. So there the step is compiled
with `mode="reduce-overhead"` (inductor, then CUDA graphs) over static shapes: every row
of the KV cache and every slot of it, each step (free rows and empty slots are computed
and masked out), and the cache, token and position buffers marked as static addresses
(updated in place, never copied into the graph's inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ling.config import ModelConfig
from ling.kernels.probe import Probe

PART = "compiled decode"


@dataclass(frozen=True)
class CompilePlan:
    """How the engine compiles its decode step on one kind of device."""

    options: dict
    """keyword arguments of `torch.compile`"""
    static_shapes: bool
    """decode every cache row over every cache slot each step (one shape: one CUDA graph)"""
    inductor: dict = field(default_factory=dict)
    """inductor settings to hold while it compiles (they must be set around each call)"""


def how_to_compile(device: torch.device) -> CompilePlan:
    """The decode step's compilation on `device`: CUDA graphs over static shapes on CUDA;
    on CPU, dynamic shapes with frozen weights and the C++ wrapper (`Engine` says why)."""
    if device.type == "cuda":
        return CompilePlan({"mode": "reduce-overhead", "dynamic": False}, static_shapes=True)
    return CompilePlan({"dynamic": True}, static_shapes=False,
                       inductor={"freezing": True, "cpp_wrapper": True, "cpp.enable_concat_linear": True})


def shape_key(cfg: ModelConfig, dtype: torch.dtype, batch: int) -> str:
    return (f"L={cfg.n_layer},d={cfg.n_embd},H={cfg.n_head},Hkv={cfg.n_kv_head},D={cfg.head_dim},"
            f"mlp={cfg.mlp}:{cfg.mlp_hidden},V={cfg.vocab_size}|{dtype}|B={batch}")


def remember(device: torch.device, key: str, **seconds: float) -> None:
    """Store measured seconds: `eager_step`, `compiled_step`, `compile`."""
    Probe(device).remember(PART, key, **seconds)


def decide(device: torch.device, key: str, decode_steps: int) -> tuple[bool, str]:
    """(compile?, why) for a request of about `decode_steps` steps."""
    known = Probe(device).recall(PART, key)
    eager, compiled, compile_s = known.get("eager_step"), known.get("compiled_step"), known.get("compile")
    if None in (eager, compiled, compile_s):
        return True, "compiling: no earlier measurement of both paths for this model here"
    saving = decode_steps * (eager - compiled)
    if saving > compile_s:
        return True, f"compiling: ~{compile_s:.0f} s to compile, saves ~{saving:.0f} s over ~{decode_steps} steps"
    return False, (f"not compiling: it took ~{compile_s:.0f} s here and would save ~{max(saving, 0):.0f} s over "
                   f"~{decode_steps} steps (measured earlier on this machine)")
