"""The batched sampler: each parameter's effect on the distribution, per-row seeds, logprobs."""

import math

import pytest
import torch

from ling.errors import LingError
from ling.infer.sampling import BatchSampler, SamplingParams

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def sampler_with(*rows: SamplingParams, prompt=(0,)) -> BatchSampler:
    sampler = BatchSampler(len(rows), vocab_size=4)
    for slot, params in enumerate(rows):
        sampler.set_slot(slot, params, list(prompt))
    return sampler


def kept(params: SamplingParams) -> list[int]:
    """Token ids the filters leave for sampling."""
    scores = sampler_with(params).filtered_logits(LOGITS, 0)
    return torch.isfinite(scores[0]).nonzero().flatten().tolist()


def test_temperature_divides_the_logits():
    scores = sampler_with(SamplingParams(temperature=0.5)).filtered_logits(LOGITS, 0)
    torch.testing.assert_close(scores, LOGITS / 0.5)


@pytest.mark.parametrize("k, expected", [(2, [0, 1]), (3, [0, 1, 2]), (0, [0, 1, 2, 3])])
def test_top_k_keeps_the_k_most_likely(k, expected):
    assert kept(SamplingParams(top_k=k, temperature=1.0)) == expected


def test_top_k_one_is_greedy_at_any_temperature():
    sampler = sampler_with(SamplingParams(top_k=1, temperature=5.0, seed=0))
    assert {int(sampler.sample(LOGITS, 0)[0]) for _ in range(50)} == {0}


@pytest.mark.parametrize("p, expected", [(0.5, [0]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(SamplingParams(top_p=p)) == expected


@pytest.mark.parametrize("min_p, expected", [(0.2, [0, 1, 2]), (0.5, [0, 1]), (0.0, [0, 1, 2, 3])])
def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability(min_p, expected):
    assert kept(SamplingParams(min_p=min_p)) == expected  # 0.2 × 0.5 = 0.1 > 0.05; 0.5 × 0.5 = 0.25 > 0.15


def test_penalties_change_the_logits_as_specified():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    generated = [2, 2, 3]  # prompt is token 0
    def after(**penalties):
        sampler = sampler_with(SamplingParams(temperature=0, **penalties))
        for token in generated:
            sampler.observe(0, torch.tensor([token]))
        return sampler.filtered_logits(logits, 0)[0].tolist()
    # Repetition (CTRL): every prompt or output token, positive logits divided, negative multiplied.
    assert after(repetition_penalty=2.0) == [1.0, 1.0, -2.0, 0.25]
    # Presence: once per generated token; frequency: per occurrence; the prompt does not count.
    assert after(presence_penalty=0.5) == [2.0, 1.0, -1.5, 0.0]
    assert after(frequency_penalty=0.25) == [2.0, 1.0, -1.5, 0.25]
    assert after(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25) == [1.0, 1.0, -3.0, -0.5]


def test_a_penalty_can_change_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0, 0.0]])
    sampler = sampler_with(SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.5))
    tokens = sampler.sample(logits.expand(2, -1), 0).tokens
    assert tokens.tolist() == [0, 1]  # token 0 is in the prompt: the penalised row avoids it


def test_sampling_follows_the_distribution():
    sampler = sampler_with(SamplingParams(seed=0))
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[int(sampler.sample(LOGITS, 0)[0])] += 1
    torch.testing.assert_close(counts / counts.sum(), PROBS[0], atol=0.03, rtol=0)


def test_each_row_draws_from_its_own_seeded_generator():
    logits = torch.randn(1, 4).expand(3, -1)
    def draws(sampler, row, n=30):
        return [int(sampler.sample(logits, 0)[0][row]) for _ in range(n)]
    seeded = SamplingParams(seed=7)
    alone = draws(sampler_with(seeded), 0)
    # The same seed in another row, next to other requests, draws the same tokens.
    assert draws(sampler_with(SamplingParams(seed=1), SamplingParams(temperature=0), seeded), 2) == alone
    assert draws(sampler_with(SamplingParams(seed=8)), 0) != alone


def test_sampling_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    sampler_with(SamplingParams()).sample(LOGITS, 0)  # no seed: a fresh OS seed, not torch.seed()
    assert torch.equal(torch.get_rng_state(), state)


def test_logprobs_are_of_the_raw_distribution():
    sampler = sampler_with(SamplingParams(temperature=0, logprobs=True, top_logprobs=2, repetition_penalty=3.0))
    tokens, records, _ = sampler.sample(LOGITS, 0)
    record = records[0]
    assert record.token_id == int(tokens[0]) == 1  # the penalty moved the choice off token 0
    assert record.logprob == pytest.approx(math.log(0.3), abs=1e-6)
    assert [t for t, _ in record.top] == [0, 1]
    assert record.top[0][1] == pytest.approx(math.log(0.5), abs=1e-6)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                 dict(top_k=-1), dict(repetition_penalty=0), dict(presence_penalty=3),
                                 dict(max_new_tokens=-1)])
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(LingError, match="invalid sampling parameter"):
        SamplingParams(**bad)
