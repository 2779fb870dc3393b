"""Pretraining batches from a flat array of token ids (a dataset's train.bin / val.bin).

Each epoch cuts the tokens into windows of `seq_len + 1` (inputs and their next-token
targets) starting at a random offset, and visits the windows in a random order, so every
token is seen once per epoch and the windows differ between epochs. The order is a pure
function of (seed, epoch), so the whole position of the sampler is two integers — saved
in `train_state.pt` for exact resume.

Every process draws the same global batch and keeps its own slice of it: N processes see
exactly the sequences one process would, in the same optimizer steps.
"""

from __future__ import annotations

import numpy as np
import torch

from ling.data.batch import Batch
from ling.errors import LingError


def window_batch(tokens: np.ndarray, starts, seq_len: int) -> Batch:
    """Inputs tokens[s : s+T] and targets tokens[s+1 : s+T+1] for each start s."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)
    return Batch(tokens=rows[:, :-1], labels=rows[:, 1:])


class PretrainSampler:
    """Training micro-batches, `accumulation` per optimizer step, for one process."""

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, accumulation: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if len(tokens) < seq_len + 1 + seq_len:
            raise LingError(
                f"the training split has {len(tokens)} tokens, too few for sequences of {seq_len} "
                f"(need at least {2 * seq_len + 1}); use a smaller --model.context-length or more data"
            )
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.accumulation, self.rank, self.world_size, self.seed = accumulation, rank, world_size, seed
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> tuple[int, torch.Tensor]:
        """(offset, permutation of window indices) of an epoch, computed once per epoch."""
        if self._order_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            offset = int(torch.randint(self.seq_len, (1,), generator=g))
            n_windows = (len(self.tokens) - 1 - offset) // self.seq_len
            self._order_epoch, self._order = epoch, (offset, torch.randperm(n_windows, generator=g))
        return self._order

    def _draw(self, n: int) -> list[int]:
        """Start offsets of the next n windows of the global order."""
        starts = []
        while len(starts) < n:
            offset, order = self._epoch_order(self.epoch)
            take = order[self.index : self.index + n - len(starts)]
            starts += (offset + take * self.seq_len).tolist()
            self.index += len(take)
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return starts

    def next_step(self) -> list[Batch]:
        """This process's micro-batches for the next optimizer step."""
        per_rank = self.micro_batch * self.accumulation
        starts = self._draw(per_rank * self.world_size)[self.rank * per_rank : (self.rank + 1) * per_rank]
        mb = self.micro_batch
        return [window_batch(self.tokens, starts[i : i + mb], self.seq_len) for i in range(0, per_rank, mb)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def validation_batches(tokens: np.ndarray, seq_len: int, micro_batch: int, n_batches: int,
                       rank: int = 0, world_size: int = 1) -> list[Batch]:
    """The fixed evaluation set: n_batches × micro_batch windows spread evenly over the
    validation split (the same every evaluation), this process's share of them."""
    if len(tokens) < seq_len + 1:
        raise LingError(
            f"the validation split has {len(tokens)} tokens, fewer than one sequence of {seq_len} + 1; "
            "use a smaller --model.context-length or a larger validation split"
        )
    n = n_batches * micro_batch
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64).tolist()
    batches = [starts[i : i + micro_batch] for i in range(0, n, micro_batch)]
    return [window_batch(tokens, s, seq_len) for s in batches[rank::world_size]]
