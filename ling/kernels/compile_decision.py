"""Whether compiling the decode step pays for a request.

`torch.compile` of the decode step (inductor, frozen weights) makes each step faster, but
compiling takes from seconds to minutes — more for deeper models, more on a cold cache —
so it pays only for requests with enough decode steps. Both sides are measured on the
machine at hand: every engine records its decode-step time, and a compiled engine its
compile time and compiled step time, per model shape, dtype and batch size (in
kernels.json, beside the kernel races; see `probe`). `decide` then compares the measured
saving over the request's steps with the measured compile time.
"""

from __future__ import annotations

import torch

from ling.config import ModelConfig
from ling.kernels.probe import Probe

PART = "compiled decode"


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
