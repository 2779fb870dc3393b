"""Preference pairs → micro-batches: chosen and rejected concatenated into one forward.

A micro-batch of B pairs is one (2B, T) batch — the B chosen sequences, then the B rejected
ones, right-padded to the longest of all 2B (as trl's `concatenated_inputs`) — so the policy
(and a LoRA run's reference) reads both completions in a single forward pass. It counts as
B examples: the trainer averages a preference loss over pairs, whatever the accumulation.
Order, epochs and resume are `SFTBatches`' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ling.data.batch import IGNORE_INDEX, Batch
from ling.data.preference import EncodedPair
from ling.data.sft_batches import SFTBatches


@dataclass
class PreferenceBatch(Batch):
    pair_ids: torch.Tensor | None = None
    """(B,) each pair's row in the reference log-probability table"""

    @property
    def num_pairs(self) -> int:
        return self.tokens.shape[0] // 2

    @property
    def num_targets(self) -> int:
        """A preference loss is one number per pair: the mean is over pairs."""
        return self.num_pairs


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> PreferenceBatch:
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(len(tokens) for tokens, _ in sequences)
    tokens = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), T), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, targets) in enumerate(sequences):
        tokens[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(targets)] = torch.tensor(targets)
    return PreferenceBatch(tokens, labels, pair_ids=torch.tensor([p.index for p in pairs]))


class PreferenceBatches(SFTBatches):
    """Seeded, resumable micro-batches of `micro_batch` pairs (2 × micro_batch sequences)."""

    def _collate(self, rows: list[list[EncodedPair]]) -> PreferenceBatch:
        return collate_pairs([pair for row in rows for pair in row], self.pad_id)
