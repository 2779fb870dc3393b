"""`TrainConfig`: the `--train.*` flags shared by pretraining and every fine-tuning method."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from ling.errors import LingError


@dataclass
class TrainConfig:
    """How to train: steps, batch, optimizer, schedule, precision, evaluation, checkpoints."""

    max_steps: int = 2000
    """optimizer steps to train for"""
    batch_tokens: int = 65536
    """global batch in tokens per optimizer step (all processes together); gradient
    accumulation = batch_tokens / (micro_batch × sequence length × processes)"""
    micro_batch: int = 16
    """sequences per forward/backward pass in each process"""
    lr: float = 1e-3
    """peak learning rate"""
    min_lr: float = 1e-4
    """learning rate at the end of the decay"""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """after warmup: cosine or linear decay to min_lr; wsd = warmup-stable-decay
    (constant, then a linear decay over the last decay_fraction of the steps); constant"""
    warmup_steps: int = 100
    """linear warmup from 0 to lr"""
    decay_fraction: float = 0.2
    """wsd only: fraction of max_steps spent decaying to min_lr"""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to 2-D weights only (not to norms, biases)"""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0 = no clipping)"""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """autocast precision (weights and optimizer stay fp32). auto = bf16 on CUDA with bf16
    and on CPUs with AVX512-BF16/AMX, else fp32; fp16 (with a gradient scaler) needs CUDA"""
    compile: bool = False
    """torch.compile the model for training and evaluation (pays off on long runs: the
    first steps include the compile time)"""
    activation_checkpointing: bool = False
    """recompute each block in the backward pass instead of storing its activations"""
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """how several processes (torchrun) share the work: ddp = each holds the whole model, its
    gradients and optimizer state; fsdp = each holds 1/N of them (FSDP2), gathering a block's
    weights just before it runs; auto = ddp when there is more than one process"""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered weights after its forward pass and gather them again
    for the backward (less memory, one more all-gather per block)"""
    eval_every: int = 250
    """evaluate on the fixed validation batches and save a checkpoint every N steps"""
    eval_batches: int = 20
    """validation micro-batches per evaluation (the same ones every time)"""
    log_every: int = 10
    """write a metrics.jsonl line every N steps"""
    keep_last: int = 3
    """checkpoints to keep (plus the best one)"""
    seed: int = 1337
    time_limit: float = 0.0
    """stop (evaluate, save) after this many minutes of training; 0 = no limit"""
    sample_tokens: int = 0
    """generate this many tokens of sample text at every evaluation (0 = none)"""
    max_bad_steps: int = 0
    """steps with a non-finite loss or gradient norm that are skipped (no update) before the run
    stops with an error naming the step; 0 = stop at the first one"""

    def __post_init__(self):
        for f in fields(self):  # inf / nan hyper-parameters would train to NaN
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise LingError(f"train.{f.name} must be a finite number, got {value}")
        for key in ("max_steps", "batch_tokens", "micro_batch", "eval_every", "eval_batches", "log_every", "keep_last"):
            if getattr(self, key) <= 0:
                raise LingError(f"train.{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.min_lr <= self.lr:
            raise LingError(f"train.min_lr must be between 0 and train.lr ({self.lr}), got {self.min_lr}")
        if not 0 < self.decay_fraction <= 1:
            raise LingError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0 or self.time_limit < 0 or self.grad_clip < 0:
            raise LingError("train.warmup_steps, train.time_limit and train.grad_clip cannot be negative")
        if self.lr <= 0:
            raise LingError(f"train.lr must be positive, got {self.lr}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise LingError(f"train.{key} must be in [0, 1) (AdamW's moving-average factor), "
                                f"got {getattr(self, key)}")
        if self.weight_decay < 0 or self.max_bad_steps < 0 or self.sample_tokens < 0:
            raise LingError("train.weight_decay, train.max_bad_steps and train.sample_tokens cannot be negative")

    def accumulation(self, seq_len: int, world_size: int) -> int:
        """Micro-batches per process per optimizer step, so that the global batch is batch_tokens."""
        per_pass = self.micro_batch * seq_len * world_size
        if self.batch_tokens % per_pass:
            lower = max(per_pass, self.batch_tokens // per_pass * per_pass)
            raise LingError(
                f"train.batch_tokens={self.batch_tokens} is not a multiple of micro_batch × seq_len × processes "
                f"= {self.micro_batch} × {seq_len} × {world_size} = {per_pass}; use e.g. --train.batch-tokens {lower}"
            )
        return self.batch_tokens // per_pass
