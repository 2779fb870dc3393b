"""Encoded examples → training batches: padding, or packing several examples per row.

Unpacked, each row holds one example, right-padded to the longest row of its batch (padding
is after every real token, so the default causal mask is exact). Packed (`--pack`), examples
are laid end to end in rows of up to `seq_len` tokens; each token then sees only earlier
tokens of its own example (`block_causal_mask`) and positions restart at 0 for each example,
so a packed example is computed exactly as it would be alone — fewer pad tokens, same loss.

`SFTBatches` walks the rows in a seeded order, epoch after epoch, and its position can be
saved and restored, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import torch

from ling.data.batch import IGNORE_INDEX, Batch
from ling.data.sft_encode import Encoded
from ling.model import block_causal_mask


def pack_examples(examples: list[Encoded], seq_len: int) -> list[list[Encoded]]:
    """Greedily fill rows of at most `seq_len` tokens with consecutive examples."""
    rows: list[list[Encoded]] = []
    used = 0
    for example in examples:
        if not rows or used + len(example.tokens) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example.tokens)
    return rows


def collate(rows: list[list[Encoded]], pad_id: int, packed: bool) -> Batch:
    """A batch of `tokens` and `labels` (B, T); packed batches add `positions` and `mask`."""
    T = max(sum(len(e.tokens) for e in row) for row in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        offset = 0
        for d, example in enumerate(row):
            n = len(example.tokens)
            tokens[b, offset:offset + n] = torch.tensor(example.tokens)
            labels[b, offset:offset + n] = torch.tensor(example.labels)
            positions[b, offset:offset + n] = torch.arange(n)
            doc_ids[b, offset:offset + n] = d
            offset += n
    if packed:
        return Batch(tokens, labels, positions, block_causal_mask(doc_ids))
    return Batch(tokens, labels)


class SFTBatches:
    """Seeded, resumable micro-batches of `micro_batch` rows, reshuffled every epoch.

    The trainer's batch source: `next_step()` gives this process its `accumulation`
    micro-batches of the next optimizer step. Every process walks the same global order and
    takes every `world_size`-th micro-batch, so processes never see the same rows in a step
    and the position to save for resume is one pair of numbers.
    """

    def __init__(self, examples: list[Encoded], micro_batch: int, pad_id: int, seed: int = 0,
                 pack: bool = False, seq_len: int | None = None, shuffle: bool = True,
                 accumulation: int = 1, rank: int = 0, world_size: int = 1):
        self.rows = pack_examples(examples, seq_len) if pack else [[e] for e in examples]
        self.micro_batch, self.pad_id, self.seed, self.pack, self.shuffle = micro_batch, pad_id, seed, pack, shuffle
        self.accumulation, self.rank, self.world_size = accumulation, rank, world_size
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def _next_rows(self) -> list[list[Encoded]]:
        picked = []
        while len(picked) < self.micro_batch:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order()
            picked.append(self.rows[self._order[self.index]])
            self.index += 1
        return picked

    def next_step(self) -> list[Batch]:
        """This process's micro-batches for the next optimizer step."""
        step = [self._next_rows() for _ in range(self.accumulation * self.world_size)]
        return [self._collate(rows) for rows in step[self.rank::self.world_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order()

    def fixed_batches(self, limit: int | None = None) -> list[Batch]:
        """Every row once (or the first `limit` micro-batches), in order, this process's share:
        the same batches at every evaluation."""
        batches = [self.rows[i:i + self.micro_batch] for i in range(0, len(self.rows), self.micro_batch)]
        return [self._collate(rows) for rows in batches[:limit][self.rank::self.world_size]]

    def _collate(self, rows: list[list[Encoded]]) -> Batch:
        """One micro-batch of rows (what a subclass changes to batch other kinds of examples)."""
        return collate(rows, self.pad_id, self.pack)
