"""`Batch`: one micro-batch as the trainer consumes it, whatever built it.

Pretraining, SFT (with prompt masking and packing) and task heads differ in how they fill
these fields, not in how the trainer uses them: `labels` holds the target of each
position, `IGNORE_INDEX` where a position does not count in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100
"""label of a position that does not count in the loss (as in PyTorch and transformers)"""


@dataclass
class Batch:
    tokens: torch.Tensor
    """(B, T) input ids"""
    labels: torch.Tensor
    """(B, T) next-token targets, IGNORE_INDEX where not counted; (B,) for a sequence task"""
    positions: torch.Tensor | None = None
    """(B, T) positions; None = 0..T-1 (packed sequences restart them per example)"""
    mask: torch.Tensor | None = None
    """(B, 1, T, T) attention mask, True = may attend; None = causal"""

    def to(self, device: torch.device) -> "Batch":
        non_blocking = device.type == "cuda"
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: (v.to(device, non_blocking=non_blocking) if v is not None else None) for k, v in moved.items()}
        return replace(self, **moved)

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def num_targets(self) -> int:
        """Positions that count in the loss: what the loss is averaged over."""
        return int((self.labels != IGNORE_INDEX).sum())
