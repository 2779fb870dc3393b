"""The pretraining sampler: coverage, exact resume, rank sharding, fixed validation set."""

import numpy as np
import pytest
import torch

from ling.data.sampler import PretrainSampler, validation_batches
from ling.errors import LingError

TOKENS = np.arange(1000, dtype=np.uint16)  # token i == position i: windows are easy to read
T = 10


def starts(batches):
    return [int(row[0]) for b in batches for row in b.tokens]


def test_windows_are_inputs_and_next_token_targets():
    (batch,) = PretrainSampler(TOKENS, T, micro_batch=4, seed=1).next_step()
    assert batch.tokens.shape == batch.labels.shape == (4, T) and batch.tokens.dtype == torch.int64
    assert torch.equal(batch.labels, batch.tokens + 1)


def test_an_epoch_visits_every_window_once_then_reshuffles():
    sampler = PretrainSampler(TOKENS, T, micro_batch=1, seed=3)
    n_windows = (len(TOKENS) - 1 - sampler._epoch_order(0)[0]) // T
    first_epoch = [starts(sampler.next_step())[0] for _ in range(n_windows)]
    assert len(set(first_epoch)) == n_windows
    assert len({s % T for s in first_epoch}) == 1  # one offset per epoch, windows do not overlap
    assert sampler.state_dict() == {"epoch": 1, "index": 0}
    second = [starts(sampler.next_step())[0] for _ in range(5)]
    assert second != first_epoch[:5]


def test_resuming_from_the_saved_position_continues_the_same_stream():
    a = PretrainSampler(TOKENS, T, micro_batch=8, accumulation=2, seed=7)
    for _ in range(6):  # crosses an epoch boundary (99 windows, 16 per step)
        a.next_step()
    state = a.state_dict()
    expected = [starts(a.next_step()) for _ in range(3)]
    b = PretrainSampler(TOKENS, T, micro_batch=8, accumulation=2, seed=7)
    b.load_state_dict(state)
    assert [starts(b.next_step()) for _ in range(3)] == expected


def test_processes_split_the_global_batch_one_process_would_draw():
    single = PretrainSampler(TOKENS, T, micro_batch=4, accumulation=2, seed=5)
    ranks = [PretrainSampler(TOKENS, T, micro_batch=4, accumulation=1, rank=r, world_size=2, seed=5) for r in (0, 1)]
    for _ in range(3):
        assert starts(single.next_step()) == starts(ranks[0].next_step()) + starts(ranks[1].next_step())


def test_validation_batches_are_fixed_and_spread_over_the_split():
    batches = validation_batches(TOKENS, T, micro_batch=2, n_batches=3)
    assert starts(batches) == [0, 197, 395, 593, 791, 989]
    assert starts(validation_batches(TOKENS, T, 2, 3, rank=1, world_size=2)) == [395, 593]


def test_too_little_data_is_a_clear_error():
    with pytest.raises(LingError, match="too few for sequences of 10"):
        PretrainSampler(TOKENS[:15], T, micro_batch=1)
    with pytest.raises(LingError, match="fewer than one sequence"):
        validation_batches(TOKENS[:5], T, 1, 1)
