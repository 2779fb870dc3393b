"""Sampling parameters and the batched sampler: logits of a batch → next token per row.

Every row of a batch carries its own `SamplingParams`, so requests with different
temperatures, filters, penalties and seeds decode together. The logits pipeline is the one
of transformers and vLLM, in this order:

1. penalties on the raw logits: repetition (CTRL: divide a positive logit, multiply a
   negative one, for every token of the prompt and the output), presence (subtract once for
   each token already generated) and frequency (subtract per occurrence in the output);
2. temperature (0 = greedy: argmax of the penalised logits);
3. top-k, then top-p (smallest set of tokens whose probability reaches p), then min-p
   (drop tokens less likely than min_p × the most likely one);
4. a draw from what is left, with the row's own `torch.Generator`: the same seed gives
   the same tokens whatever else is in the batch.

Every admitted value is safe in float32: a temperature below `MIN_TEMPERATURE` is greedy
decoding and a top_p below `MIN_TOP_P` keeps the top token only (either would underflow to 0
in the per-row tensors and turn the scores into NaN), top-p always keeps the most likely
token, and a row whose scores are not finite is reported as that row's error rather than
raised, so one request's problem never ends the others in its batch.

Log-probabilities, when asked for, are those of the model's raw distribution (before
penalties and filters), as OpenAI's API reports them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ling.errors import LingError

MIN_TEMPERATURE = 1e-5
"""temperatures below this are greedy decoding (as vLLM's _SAMPLING_EPS)"""
MIN_TOP_P = 1e-5
"""top_p below this keeps only the most likely token"""


@dataclass
class SamplingParams:
    """How to pick tokens for one request, and when to stop."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    """0 = greedy decoding"""
    top_k: int = 0
    """keep the k most likely tokens (0 = off)"""
    top_p: float = 1.0
    """keep the smallest set of tokens whose probability reaches top_p (1 = off)"""
    min_p: float = 0.0
    """drop tokens less likely than min_p × the most likely token's probability (0 = off)"""
    repetition_penalty: float = 1.0
    """> 1 discourages any token of the prompt or the output (1 = off)"""
    presence_penalty: float = 0.0
    """subtracted once from the logit of every token already generated"""
    frequency_penalty: float = 0.0
    """subtracted from a token's logit for each time it was already generated"""
    stop: list[str] = field(default_factory=list)
    """stop strings: generation ends before the first one, which never appears in the output"""
    stop_token_ids: list[int] = field(default_factory=list)
    """token ids that end generation (the tokenizer's EOS is one unless ignore_eos)"""
    ignore_eos: bool = False
    seed: int | None = None
    """seeds this request's own random generator: same seed, same text"""
    logprobs: bool = False
    """report the log-probability of each generated token"""
    top_logprobs: int = 0
    """also report this many most likely alternatives per position"""
    slide: bool = True
    """when prompt + output fill the context, keep going on its most recent part (a sliding
    window, re-prefilled); with --no-slide generation stops there (finish_reason 'length')"""

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        checks = [  # comparisons with NaN are False: NaN fails every range check
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be >= 0 and finite"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
             "repetition_penalty must be > 0 and finite (1 = off)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (0 <= self.top_logprobs <= 20, "top_logprobs must be in [0, 20]"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, "seed must fit in 64 bits"),
        ]
        for ok, message in checks:
            if not ok:
                raise LingError(f"invalid sampling parameter: {message}")
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        if self.top_p < MIN_TOP_P:
            self.top_k = 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def random_seed() -> int:
    """A fresh seed from the OS, leaving torch's global RNG (e.g. a training run's) untouched."""
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass
class TokenLogprob:
    """The generated token's log-probability and the most likely alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampled(NamedTuple):
    """What `BatchSampler.sample` gives for n rows."""

    tokens: torch.Tensor
    """(n,) next token per row"""
    records: list[TokenLogprob | None]
    """per row, the logprob record if that row asked for one"""
    errors: dict[int, str]
    """rows that could not be sampled (their scores are not finite), with why"""


class BatchSampler:
    """Per-slot sampling state for a batch of up to `max_batch` rows.

    A slot is set when a request joins (its parameters become rows of small tensors, its
    prompt is remembered for the repetition penalty) and cleared when it leaves; `sample`
    then handles any contiguous range of slots with one set of batched tensor operations,
    taking the cheap path (one argmax) when every row is greedy and unpenalised.
    """

    def __init__(self, max_batch: int, vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.params: list[SamplingParams | None] = [None] * max_batch
        self.generators: list[torch.Generator | None] = [None] * max_batch
        per_slot = lambda value, dtype=torch.float32: torch.full((max_batch,), value, device=device, dtype=dtype)  # noqa: E731
        self.temperature, self.top_p, self.min_p = per_slot(1.0), per_slot(1.0), per_slot(0.0)
        self.top_k = per_slot(0, torch.long)
        self.repetition, self.presence, self.frequency = per_slot(1.0), per_slot(0.0), per_slot(0.0)
        self.counts: torch.Tensor | None = None
        """(max_batch, vocab) generated-token counts, allocated when a request needs penalties"""
        self.seen: torch.Tensor | None = None
        """(max_batch, vocab) True for tokens of the prompt or output (repetition penalty)"""

    # ---- slots -------------------------------------------------------------------------
    def set_slot(self, slot: int, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.params[slot] = params
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else random_seed())
        self.generators[slot] = generator
        self.temperature[slot] = params.temperature if not params.greedy else 1.0
        self.top_k[slot] = min(params.top_k, self.vocab_size)
        self.top_p[slot], self.min_p[slot] = params.top_p, params.min_p
        self.repetition[slot] = params.repetition_penalty
        self.presence[slot], self.frequency[slot] = params.presence_penalty, params.frequency_penalty
        if params.penalised:
            if self.counts is None:
                shape = (len(self.params), self.vocab_size)
                self.counts = torch.zeros(shape, device=self.device)
                self.seen = torch.zeros(shape, device=self.device, dtype=torch.bool)
            self.counts[slot] = 0
            self.seen[slot] = False
            self.seen[slot, torch.tensor(prompt_ids, device=self.device, dtype=torch.long)] = True

    def clear_slot(self, slot: int) -> None:
        self.params[slot] = self.generators[slot] = None

    def observe(self, start: int, tokens: torch.Tensor) -> None:
        """Record the tokens just generated by slots start.. (for the penalties)."""
        if self.counts is None:
            return
        rows = torch.arange(start, start + len(tokens), device=self.device)
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)
        self.seen[rows, tokens] = True

    # ---- sampling ----------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, start: int) -> Sampled:
        """Next tokens for slots start..start+n from their logits (n, V), the logprob records
        asked for, and the rows that could not be sampled. Empty slots get a greedy token."""
        params = self.params[start : start + logits.shape[0]]
        # NaN never wins and +inf is the largest float: the softmax of a row stays finite.
        largest = torch.finfo(torch.float32).max
        scores = self.filtered_logits(logits, start).nan_to_num(nan=float("-inf"), posinf=largest)
        usable = (scores > float("-inf")).any(dim=-1).tolist()
        errors = {row: "the model's scores for this sequence are not finite (NaN)"
                  for row, p in enumerate(params) if p is not None and not usable[row]}
        tokens = scores.argmax(dim=-1)
        sampled = [row for row, p in enumerate(params) if p is not None and not p.greedy and row not in errors]
        if sampled:
            probs = scores.softmax(dim=-1)
            for row in sampled:
                tokens[row] = torch.multinomial(probs[row], 1, generator=self.generators[start + row])[0]
        records: list[TokenLogprob | None] = [None] * len(params)
        if any(p is not None and (p.logprobs or p.top_logprobs) for p in params):
            records = self._logprobs(logits.float(), tokens, params)
        return Sampled(tokens, records, errors)

    def filtered_logits(self, logits: torch.Tensor, start: int) -> torch.Tensor:
        """The logits rows start.. sample from: penalised, divided by the temperature, with the
        tokens that top-k / top-p / min-p drop set to -inf. Greedy-only batches stop after the
        penalties (their argmax is all that is needed)."""
        n = logits.shape[0]
        sl = slice(start, start + n)
        live = [p for p in self.params[sl] if p is not None]
        scores = logits.float()
        if any(p.penalised for p in live):
            scores = self._penalise(scores, sl)
        if all(p.greedy for p in live):
            return scores
        scores = scores / self.temperature[sl, None]
        top_k = self.top_k[sl]
        if any(p.top_k for p in live):
            k = torch.where(top_k > 0, top_k, scores.shape[-1]).clamp(max=scores.shape[-1])
            kth = torch.topk(scores, int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if any(p.top_p < 1 for p in live):
            top_p = self.top_p[sl, None]
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            sorted_probs = sorted_scores.softmax(dim=-1)
            # Drop a token when the tokens ranked above it already reach top_p.
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p) & (top_p < 1)
            drop[:, 0] = False  # the most likely token always stays
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        if any(p.min_p > 0 for p in live):
            # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
            floor = scores.amax(dim=-1, keepdim=True) + self.min_p[sl, None].log()
            scores = scores.masked_fill(scores < floor, float("-inf"))
        return scores

    def _penalise(self, scores: torch.Tensor, sl: slice) -> torch.Tensor:
        rep = self.repetition[sl, None]
        penalised = torch.where(scores > 0, scores / rep, scores * rep)
        scores = torch.where(self.seen[sl], penalised, scores)
        counts = self.counts[sl]
        return scores - self.frequency[sl, None] * counts - self.presence[sl, None] * (counts > 0)

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, params: list) -> list[TokenLogprob | None]:
        logprobs = raw.log_softmax(dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
        k = max((p.top_logprobs for p in params if p is not None), default=0)
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        records: list[TokenLogprob | None] = []
        for row, p in enumerate(params):
            if p is None or not (p.logprobs or p.top_logprobs):
                records.append(None)
                continue
            top = []
            if p.top_logprobs:
                top = list(zip(top_ids[row, : p.top_logprobs].tolist(), top_values[row, : p.top_logprobs].tolist()))
            records.append(TokenLogprob(int(tokens[row]), chosen[row], top))
        return records
