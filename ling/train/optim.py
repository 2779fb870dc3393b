"""AdamW with weight decay on matrices only, and the learning-rate schedules.

Weight decay pulls weights towards zero; that regularises the 2-D weight matrices (and
embeddings) but only hurts gains and biases, so those get none (as in GPT-2/nanoGPT).
Only parameters with `requires_grad` are optimised: a fine-tuning method that freezes the
base model (LoRA) gets an optimizer over its adapters alone.

A schedule is a pure function of the step, so resuming needs nothing but the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ling.train.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: trainable tensors with ≥ 2 dimensions decay, the rest do not."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # a tied weight is listed once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where this device has it, else foreach."""
    fused = device_type in ("cpu", "cuda", "mps")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        fused=fused, foreach=None if fused else True,
    )


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate at each step: linear warmup, then cosine / linear / warmup-stable-decay."""

    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    kind: str = "cosine"
    decay_fraction: float = 0.2

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "LRSchedule":
        return cls(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule, cfg.decay_fraction)

    def __call__(self, step: int) -> float:
        """The rate for optimizer step `step` (0-based): the peak is reached at the last
        warmup step and min_lr at the last step, max_steps - 1."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        if self.kind == "wsd":
            decay_steps = max(1, round(self.decay_fraction * self.max_steps))
            decay_start = self.max_steps - decay_steps
            if step < decay_start:
                return self.lr
            progress = (step + 1 - decay_start) / decay_steps
        else:
            progress = (step + 1 - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, progress)
        if self.kind == "cosine":
            return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)
        return self.lr - progress * (self.lr - self.min_lr)  # linear, and the decay of wsd

    def set(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
