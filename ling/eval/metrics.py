"""Summed losses and counts over batches: the numbers behind loss, perplexity, bits per byte
and accuracy.

Everything is summed, not averaged, batch by batch, so a metric over a whole dataset is
exact however it is split into batches (and equals what one giant batch would give).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from ling.data.batch import IGNORE_INDEX, Batch
from ling.train.trainer import lm_loss


@dataclass
class LMScore:
    nll: float = 0.0
    """summed negative log-likelihood, nats"""
    tokens: int = 0

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def bits_per_byte(self, n_bytes: int) -> float:
        return self.nll / math.log(2) / n_bytes


@torch.no_grad()
def score_lm(model, batches: Iterable[Batch], device, autocast) -> LMScore:
    """Loss over every labelled position of `batches` (LM text, or assistant tokens of chats)."""
    score = LMScore()
    for batch in batches:
        with autocast:
            score.nll += float(lm_loss(model, batch.to(device)))
        score.tokens += batch.num_targets
    return score


@torch.no_grad()
def score_classifier(model, batches: Iterable[Batch], device, autocast) -> tuple[float, float, int]:
    """(mean cross-entropy, accuracy, examples) of a `SequenceClassifier` (labels at each example's last token)."""
    nll, correct, n = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast:
            logits = model(batch.tokens, batch.positions, batch.mask).float()
        counted = batch.labels != IGNORE_INDEX
        logits, labels = logits[counted], batch.labels[counted]
        nll += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        n += len(labels)
    return nll / max(n, 1), correct / max(n, 1), n


def text_windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Cut a token stream into windows of up to `seq_len + 1` ids that overlap by one, so that
    every id after the first is predicted exactly once (the window's last id is only a target)."""
    return [ids[i:i + seq_len + 1] for i in range(0, max(len(ids) - 1, 1), seq_len)]
