"""A running batch: up to `max_batch_size` sequences decoding together in one static KV cache.

Sequences join and leave between steps. Row i of the cache always holds `rows[i]`: a new
sequence is prefilled straight into the first free row, and when a sequence leaves, the
last row's keys and values move into its place, so one decode step runs exactly the
active rows (batch 1 costs batch 1). Each row writes and attends at its own positions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ling.infer.generate import sample_next
from ling.model import KVCache, Transformer
from ling.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    """None: none; k ≥ 0: the chosen token's logprob and the k most likely alternatives"""


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(eq=False)
class Sequence:
    """One generated continuation of `prompt` and its progress (compared by identity)."""

    prompt: list[int]
    params: SamplingParams
    generated: list[int] = field(default_factory=list)
    text: str = ""
    """text emitted so far (a stop string never appears in it)"""
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    _next_input: int | None = None


@dataclass
class StepOutput:
    """What one step produced for one sequence: new text (possibly empty) and whether it ended."""

    sequence: Sequence
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


class BatchRunner:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int, max_len: int):
        self.model, self.tokenizer = model.eval(), tokenizer
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(model.cfg, max_batch_size, max_len, device=param.device, dtype=param.dtype)
        self.max_batch_size, self.max_len = max_batch_size, max_len
        self.rows: list[Sequence] = []
        self.stop_ids = {i for i in (tokenizer.eos_id,) if i is not None}

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - len(self.rows)

    @torch.no_grad()
    def add(self, seq: Sequence) -> StepOutput:
        """Prefill `seq` into a free row and sample its first token."""
        assert self.free_slots > 0 and len(seq.prompt) < self.max_len
        seq.generator = torch.Generator(device=self.device)
        if seq.params.seed is not None:
            seq.generator.manual_seed(seq.params.seed)
        else:
            seq.generator.seed()
        row = len(self.rows)
        view = copy.copy(self.cache)  # the same buffers, seen as a batch of the one row
        view.k = [k[row:row + 1] for k in self.cache.k]
        view.v = [v[row:row + 1] for v in self.cache.v]
        view.kv_len = len(seq.prompt)
        tokens = torch.tensor([seq.prompt], device=self.device)
        positions = torch.arange(len(seq.prompt), device=self.device)[None]
        logits = self.model(tokens, positions, cache=view)[:, -1]
        self.rows.append(seq)
        return self._advance(seq, logits[0])

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """One decode step for every row: each gets its next token."""
        if not self.rows:
            return []
        positions = torch.tensor([[len(s.prompt) + len(s.generated) - 1] for s in self.rows], device=self.device)
        tokens = torch.tensor([[s.generated[-1]] for s in self.rows], device=self.device)
        self.cache.kv_len = int(positions.max()) + 1
        logits = self.model(tokens, positions, cache=self.cache)[:, -1]
        return [self._advance(seq, logits[i]) for i, seq in enumerate(list(self.rows))]

    def remove(self, seq: Sequence) -> None:
        """Free `seq`'s row; the last row moves into it."""
        i = self.rows.index(seq)
        last = len(self.rows) - 1
        if i != last:
            n = len(self.rows[last].prompt) + len(self.rows[last].generated)
            for buffers in (self.cache.k, self.cache.v):
                for b in buffers:
                    b[i, :, :n] = b[last, :, :n]
            self.rows[i] = self.rows[last]
        self.rows.pop()

    # ---- per-sequence bookkeeping ---------------------------------------------------------
    def _advance(self, seq: Sequence, logits: torch.Tensor) -> StepOutput:
        p = seq.params
        logits = logits.float()[None]
        if seq.generated and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(seq.generated, device=logits.device), minlength=logits.shape[-1])
            logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        token = int(sample_next(logits, p.temperature, top_p=p.top_p, generator=seq.generator))
        logprobs = []
        if p.logprobs is not None:
            lp = logits.log_softmax(-1)[0]
            top = torch.topk(lp, p.logprobs) if p.logprobs else None
            logprobs.append(TokenLogprob(
                self.tokenizer.decode([token]), float(lp[token]),
                [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(*top)] if top else []))
        seq.generated.append(token)
        finish = None
        if token in self.stop_ids:
            finish = "stop"
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        hit = _find_stop(text, p.stop, start=len(seq.text))
        if hit is not None:
            text, finish = text[:hit], "stop"
        elif finish is None:
            if len(seq.generated) >= p.max_tokens or len(seq.prompt) + len(seq.generated) >= self.max_len:
                finish = "length"
            else:  # hold back an unfinished UTF-8 character and a possible start of a stop string
                text = text[: len(text) - _holdback(text, p.stop)]
        delta = text[len(seq.text):] if len(text) > len(seq.text) else ""
        seq.text += delta
        seq.finish_reason = finish
        return StepOutput(seq, delta, logprobs, finish)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index of the earliest stop string in `text` that ends after `start`."""
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters must wait for the next token before they can be sent."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
