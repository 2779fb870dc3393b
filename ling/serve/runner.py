"""INTERIM stand-in for `ling.infer.Engine` (being built on another branch), with its API:
`add_request(prompt_ids, params, request_id)`, `abort(request_id)`, `step() -> [Delta]`,
`has_work()`, `num_running()`, `num_waiting()`. Replaced by the engine when it lands.

A running batch: up to `max_batch_size` sequences decoding together in one static KV cache.
Row i of the cache always holds `rows[i]`: a new request is prefilled straight into the
first free row, and when one leaves, the last row's keys and values move into its place, so
one decode step runs exactly the active rows.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ling.infer.generate import sample_next
from ling.model import KVCache, Transformer
from ling.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    generated: list[int] = field(default_factory=list)
    text: str = ""
    generator: torch.Generator | None = None


class BatchRunner:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int, max_len: int):
        self.model, self.tokenizer = model.eval(), tokenizer
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(model.cfg, max_batch_size, max_len, device=param.device, dtype=param.dtype)
        self.max_batch_size, self.max_len = max_batch_size, max_len
        self.rows: list[_Request] = []
        self._waiting: deque[_Request] = deque()
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self.stop_ids = {i for i in (tokenizer.eos_id,) if i is not None}

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> str:
        with self._lock:
            self._waiting.append(_Request(request_id, list(prompt_ids), params))
        return request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._aborted or self.rows)

    def num_running(self) -> int:
        return len(self.rows)

    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @torch.no_grad()
    def step(self) -> list[Delta]:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            deltas = [Delta(r.id, [], "", finish_reason="abort") for r in self._waiting if r.id in aborted]
            self._waiting = deque(r for r in self._waiting if r.id not in aborted)
        for r in [r for r in self.rows if r.id in aborted]:
            self._remove(r)
            deltas.append(Delta(r.id, [], "", finish_reason="abort"))
        if self.rows:
            positions = torch.tensor([[len(r.prompt) + len(r.generated) - 1] for r in self.rows], device=self.device)
            tokens = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.device)
            self.cache.kv_len = int(positions.max()) + 1
            logits = self.model(tokens, positions, cache=self.cache)[:, -1]
            deltas += [self._advance(r, logits[i]) for i, r in enumerate(list(self.rows))]
        while len(self.rows) < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
            deltas.append(self._prefill(request))
        return deltas

    def _prefill(self, r: _Request) -> Delta:
        r.generator = torch.Generator(device=self.device)
        if r.params.seed is not None:
            r.generator.manual_seed(r.params.seed)
        else:
            r.generator.seed()
        row = len(self.rows)
        view = copy.copy(self.cache)  # the same buffers, seen as a batch of the one row
        view.k = [k[row:row + 1] for k in self.cache.k]
        view.v = [v[row:row + 1] for v in self.cache.v]
        view.kv_len = len(r.prompt)
        tokens = torch.tensor([r.prompt], device=self.device)
        positions = torch.arange(len(r.prompt), device=self.device)[None]
        logits = self.model(tokens, positions, cache=view)[:, -1]
        self.rows.append(r)
        return self._advance(r, logits[0])

    def _remove(self, r: _Request) -> None:
        i = self.rows.index(r)
        last = len(self.rows) - 1
        if i != last:
            n = len(self.rows[last].prompt) + len(self.rows[last].generated)
            for buffers in (self.cache.k, self.cache.v):
                for b in buffers:
                    b[i, :, :n] = b[last, :, :n]
            self.rows[i] = self.rows[last]
        self.rows.pop()

    def _advance(self, r: _Request, logits: torch.Tensor) -> Delta:
        p = r.params
        logits = logits.float()[None]
        raw = logits
        if r.generated and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(r.generated, device=logits.device), minlength=logits.shape[-1])
            logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        token = int(sample_next(logits, p.temperature, top_p=p.top_p, generator=r.generator))
        logprobs = []
        if p.logprobs:
            lp = raw.log_softmax(-1)[0]
            top = torch.topk(lp, p.top_logprobs) if p.top_logprobs else None
            logprobs.append(TokenLogprob(token, float(lp[token]),
                                         [(int(i), float(v)) for v, i in zip(*top)] if top else []))
        r.generated.append(token)
        finish = "stop" if token in self.stop_ids else None
        text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
        hit = _find_stop(text, p.stop, start=len(r.text))
        if hit is not None:
            text, finish = text[:hit], "stop"
        elif finish is None:
            if len(r.generated) >= p.max_new_tokens or len(r.prompt) + len(r.generated) >= self.max_len:
                finish = "length"
            else:  # hold back an unfinished UTF-8 character and a possible start of a stop string
                text = text[: len(text) - _holdback(text, p.stop)]
        delta = text[len(r.text):] if len(text) > len(r.text) else ""
        r.text += delta
        if finish is not None:
            self._remove(r)
        return Delta(r.id, [token], delta, logprobs, finish)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _holdback(text: str, stops: list[str]) -> int:
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
