"""Encoded examples → training batches: padding, or packing several examples per row.

Unpacked, each row holds one example, right-padded to the longest row of its batch (padding
is after every real token, so the default causal mask is exact). Packed (`--pack`), examples
are laid end to end in rows of up to `seq_len` tokens; each token then sees only earlier
tokens of its own example (`block_causal_mask`) and positions restart at 0 for each example,
so a packed example is computed exactly as it would be alone — fewer pad tokens, same loss.

Classification examples (with a `target`) batch as tokens, class labels and the index of
each row's last token.

`SFTBatches` walks the rows in a seeded order, epoch after epoch, and its position can be
saved and restored, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import torch

from ling.data.sft_encode import IGNORE, Encoded
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


def collate(rows: list[list[Encoded]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """A batch: `tokens` and `labels` (B, T); packed batches add `positions` and `mask`."""
    T = max(sum(len(e.tokens) for e in row) for row in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
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
    batch = {"tokens": tokens, "labels": labels}
    if packed:
        batch["positions"] = positions
        batch["mask"] = block_causal_mask(doc_ids)
    return batch


def collate_classification(rows: list[list[Encoded]], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """A classification batch: `tokens` (B, T), class `labels` (B,), and each row's `last` real position (B,)."""
    examples = [row[0] for row in rows]
    T = max(len(e.tokens) for e in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for b, example in enumerate(examples):
        tokens[b, : len(example.tokens)] = torch.tensor(example.tokens)
    return {
        "tokens": tokens,
        "labels": torch.tensor([e.target for e in examples]),
        "last": torch.tensor([len(e.tokens) - 1 for e in examples]),
    }


class SFTBatches:
    """Endless, seeded, resumable batches of `micro_batch` rows (reshuffled every epoch)."""

    def __init__(self, examples: list[Encoded], micro_batch: int, pad_id: int, seed: int = 0,
                 pack: bool = False, seq_len: int | None = None, shuffle: bool = True):
        self.classify = examples[0].target is not None
        self.rows = pack_examples(examples, seq_len) if pack else [[e] for e in examples]
        self.micro_batch, self.pad_id, self.seed, self.pack, self.shuffle = micro_batch, pad_id, seed, pack, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < self.micro_batch:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order()
            picked.append(self.rows[self._order[self.index]])
            self.index += 1
        return self._collate(picked)

    def _collate(self, rows: list[list[Encoded]]) -> dict[str, torch.Tensor]:
        return (collate_classification if self.classify else collate)(rows, self.pad_id, self.pack)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order()

    def fixed_batches(self) -> list[dict[str, torch.Tensor]]:
        """Every row once, in order, in batches of `micro_batch` (the last may be smaller): for evaluation."""
        return [self._collate(self.rows[i:i + self.micro_batch])
                for i in range(0, len(self.rows), self.micro_batch)]
