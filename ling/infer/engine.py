"""The inference engine: batched, streaming generation on one static KV cache.

One `Engine` serves `ling generate`, `ling chat`, evaluation and the server. It owns a KV
cache of `max_batch_size` rows × `max_len` slots, allocated once. Each request takes a free
row (a *slot*) when it joins, is prefilled alone into that row, and then decodes together
with every other running request, one token per row per step; a finished request frees its
row at once for the next one. That is continuous batching, and `generate` / `stream` are
just loops over it:

    engine = Engine("runs/x/checkpoints/best", dtype="bf16")
    engine.generate(["Once upon", "To be"], SamplingParams(temperature=0))
    for index, delta in engine.stream(["你好"], SamplingParams(max_new_tokens=20)):
        print(delta.text, end="", flush=True)

    # a server's loop: requests join and leave between steps
    rid = engine.add_request("Hello", SamplingParams(seed=1))
    while engine.has_work():
        for delta in engine.step(): ...

Why rows of one batch do not disturb each other: every row has its own positions (RoPE
angle, cache slot), the model's default mask is causal over those positions (a query at
position p reads slots ≤ p, so leftovers of an earlier request beyond p are never seen),
and each row samples with its own parameters and random generator. A prompt's greedy
output is therefore the same alone or in any batch (tested).

Speed comes from (1) the kernels chosen for this machine when the engine loads a model
(`ling.kernels.apply_inference_kernels`: on CPU, prepacked or ATen linears per weight shape,
SDPA or matmul attention for the decode step, and the KV cache's dtype, each timed on the
model's shapes), (2) reading only the cache slots in use (`KVCache.kv_len`), (3) little
work per step besides the forward: preallocated token/position buffers updated in place,
one argmax for a greedy batch. `torch.compile` of the decode step (`compile=True`: on CPU
inductor with frozen weights and its C++ wrapper; on CUDA `mode="reduce-overhead"`, CUDA
graphs over static shapes — see `ling.kernels.compile_decision`) takes seconds to tens of
seconds to compile, so it is opt-in: worth it for a server or a long batch job, not for one
prompt (see BENCHMARKS.md, section Inference).

Past the context. A request that fills its cache row (prompt + output = `max_len`) and has
tokens still to go *slides*: the most recent `slide_keep` tokens (three quarters of the
row) are prefilled again from position 0, as a fresh forward on that window, and decoding
goes on from there — what nanoGPT's sampler does by cropping its input to the context, but
re-prefilling once per quarter of the context rather than running the whole window for
every token. Each token after a slide is the model's prediction from that window alone,
so text past the context is that of a model which sees only its most recent part. A
request with `slide=False` (the server's: OpenAI semantics) stops there instead with
finish_reason 'length'.

A request's own failure (its scores are not finite, its first tokens cannot be set up,
its text cannot be decoded) ends that request alone, with finish_reason "error" and the
reason in `Delta.error`; the others in the batch go on as if nothing happened. Only a
failure of the shared decode step itself raises from `step`.

Threading: `add_request` and `abort` may be called from any thread; `step` (and therefore
`generate` / `stream`) from one thread at a time.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ling.checkpoint import load_checkpoint, resolve_dtype, unwrap
from ling.errors import LingError
from ling.infer.detokenize import IncrementalDetokenizer, StopStrings
from ling.infer.sampling import BatchSampler, SamplingParams, TokenLogprob
from ling.kernels import (
    Choice,
    KernelReport,
    apply_inference_kernels,
    check_mode,
    compile_decision,
    plan_inference_kernels,
)
from ling.model import KVCache, Transformer
from ling.tokenizer import Tokenizer


@dataclass
class Delta:
    """What one step produced for one request: usually one token and the text it completed."""

    request_id: str
    token_ids: list[int]
    text: str
    """new text, never half a character, never part of a stop string ('' without a tokenizer)"""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    """None while running; then 'stop' (stop token or string), 'length' (max_new_tokens or
    the context is full), 'abort' or 'error'"""
    error: str | None = None
    """why this request failed (finish_reason 'error'); the rest of the batch is unaffected"""
    slid: bool = False
    """this token came right after a slide: the context was full and its most recent part was re-prefilled"""


@dataclass
class Completion:
    """A finished request: its text, tokens (a final stop token included) and token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None
    slides: int = 0
    """how many times the context filled and generation went on in its most recent part"""

    @classmethod
    def from_deltas(cls, deltas: list[Delta], prompt_tokens: int) -> "Completion":
        return cls(
            text="".join(d.text for d in deltas),
            token_ids=[t for d in deltas for t in d.token_ids],
            finish_reason=deltas[-1].finish_reason,
            prompt_tokens=prompt_tokens,
            logprobs=[x for d in deltas for x in d.logprobs],
            error=deltas[-1].error,
            slides=sum(d.slid for d in deltas),
        )


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer | None
    stops: StopStrings
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    position: int = 0
    """position of the token to be fed next (= tokens already in the cache)"""
    window_start: int = 0
    """index in prompt + output of the token at cache position 0 (> 0 once it slid)"""

    def window(self) -> list[int]:
        """The tokens of the cache row, in position order, and the one to be fed next."""
        return (self.prompt_ids + self.output_ids)[self.window_start:]


class Engine:
    """Batched generation with continuous batching over a static KV cache."""

    def __init__(self, model: Transformer | str | Path, tokenizer: Tokenizer | None = None, *,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 max_batch_size: int = 8, max_len: int | None = None, compile: bool = False,
                 kernels: str = "auto", owns_model: bool = False, draft: "Engine | str | Path | None" = None,
                 num_speculative_tokens: int = 4):
        """`model`: a checkpoint directory (ling or Hugging Face) or a `Transformer` (used as
        is, on its own device and dtype: a live model is decoded as it is, without kernels, unless
        `owns_model` says the engine may change its modules).
        `max_len` bounds prompt + output per request (the model's context length by default).
        `kernels`: 'auto' (measure and keep the fastest, see `self.kernels`) or 'reference'.
        `draft`: a small model with the same vocabulary for speculative decoding of greedy
        requests (`num_speculative_tokens` proposed per step)."""
        check_mode(kernels)
        if isinstance(model, (str, Path)):
            model, loaded_tokenizer = load_checkpoint(model, device=device or "cpu", dtype=resolve_dtype(dtype))
            tokenizer = tokenizer or loaded_tokenizer
            owned = True
        else:
            if device is not None or dtype is not None:
                raise LingError("Engine(model): device and dtype come from the model; move it with model.to(...)")
            model = unwrap(model)  # a torch.compile / DDP wrapper (e.g. the trainer's): decode the bare model
            owned = owns_model
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = min(max_len or self.cfg.context_length, self.cfg.context_length)
        if max_batch_size < 1 or self.max_len < 2:
            raise LingError(f"Engine needs max_batch_size >= 1 and max_len >= 2 (got {max_batch_size}, {self.max_len})")
        self.max_batch_size = max_batch_size
        self.slide_keep = max(1, self.max_len * 3 // 4)
        """tokens kept when a request's row is full and it slides: enough context to go on in
        the same voice, and few enough that re-prefilling happens once per quarter of the row"""
        self.kernels = KernelReport("reference")
        """the kernels this engine decodes with (`ling.kernels`)"""
        cache_dtype = self.dtype
        if owned:
            self.kernels = plan_inference_kernels(self.model, mode=kernels, max_batch_size=max_batch_size,
                                                  max_len=self.max_len, compile=compile)
            cache_dtype = apply_inference_kernels(self.model, self.kernels)
        self.compiled = compile
        self.compile_seconds: float | None = None
        """how long compiling the decode step took (measured by `warm_up`)"""
        self._owned = owned
        self._step_times: dict[int, list[float]] = {}
        """rows → [decode steps, seconds] (the engine's own speed, for `compile_decision`)"""
        plan = compile_decision.how_to_compile(self.device) if compile else None
        self._decode_model = torch.compile(self.model, **plan.options) if compile else self.model
        self._static_decode = plan is not None and plan.static_shapes
        """decode all rows over all cache slots each step (the CUDA-graph path, see `compile_decision`)"""
        self._compile_config = contextlib.nullcontext
        if plan is not None and plan.inductor:
            # On CPU, freezing (weights as constants) lets inductor prepack them as `prepack`
            # would, and concatenate the weights of matmuls that share an input (SwiGLU's gate
            # and up: one call instead of two, ~3% of a llama-110m step at one row); the C++
            # wrapper calls the generated kernels without a Python line per op, which is most
            # of a small model's decode step. These must be set while inductor compiles,
            # which happens inside the first calls: a config patch around each call (~15 µs;
            # as torch.compile `options` the freezing does not take effect).
            from torch._inductor import config as inductor_config

            self._compile_config = functools.partial(inductor_config.patch, plan.inductor)
        with torch.inference_mode():
            self.cache = KVCache(self.cfg, max_batch_size, self.max_len, device=self.device, dtype=cache_dtype)
            self._tokens = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
            self._positions = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
            self._live = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
            self._arange = torch.arange(self.max_len, device=self.device)
        if self._static_decode:  # a CUDA graph reads and writes these in place, at fixed addresses
            for buffer in (*self.cache.k, *self.cache.v, self._tokens, self._positions):
                torch._dynamo.mark_static_address(buffer)
        self.sampler = BatchSampler(max_batch_size, self.cfg.vocab_size, self.device)
        self._slots: list[_Request | None] = [None] * max_batch_size
        self._waiting: deque[_Request] = deque()
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        if isinstance(draft, (str, Path)):
            draft = Engine(draft, device=self.device, dtype=self.dtype, max_batch_size=max_batch_size, max_len=self.max_len,
                           kernels=kernels)
        if draft is not None:
            if draft.cfg.vocab_size != self.cfg.vocab_size:
                raise LingError(
                    f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the model's "
                    f"({self.cfg.vocab_size}): speculative decoding needs the same tokenizer"
                )
            if draft.max_batch_size < max_batch_size or draft.max_len < self.max_len:
                raise LingError("the draft engine needs at least this engine's max_batch_size and max_len")
            if num_speculative_tokens < 1:
                raise LingError("num_speculative_tokens must be at least 1")
        self.draft, self.num_speculative_tokens = draft, num_speculative_tokens
        self.speculation = {"proposed": 0, "accepted": 0}
        """draft tokens proposed and accepted so far (acceptance rate = accepted / proposed)"""

    # ---- requests ------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LingError("this model has no tokenizer (tokenizer.json): give prompts as token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (text or token ids); it joins the batch at the next `step`."""
        params = params or SamplingParams()
        prompt_ids = self.encode_prompt(prompt)
        self.check(prompt_ids, params)
        stop_ids = set(params.stop_token_ids)
        eos = self.tokenizer.eos_id if self.tokenizer is not None else None
        if eos is not None and not params.ignore_eos:
            stop_ids.add(eos)
        request = _Request(
            id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=params.max_new_tokens if params.slide else min(params.max_new_tokens,
                                                                          self.max_len - len(prompt_ids)),
            stop_ids=frozenset(stop_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer is not None else None,
            stops=StopStrings(params.stop),
        )
        with self._lock:
            self._waiting.append(request)
        return request.id

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise a `LingError` if this request cannot run (what `add_request` checks first)."""
        if not prompt_ids:
            raise LingError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_len:
            raise LingError(
                f"the prompt is {len(prompt_ids)} tokens but the context holds {self.max_len} "
                f"(prompt + output): shorten the prompt"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise LingError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{self.cfg.vocab_size - 1})")
        if self.draft is not None and not (params.greedy and not params.penalised and not params.logprobs
                                           and not params.top_logprobs):
            raise LingError("speculative decoding (a draft model) supports greedy decoding only: "
                            "temperature 0, no penalties, no logprobs")

    def abort(self, request_id: str) -> None:
        """Stop a request (waiting or running); its slot is freed at the next `step`."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._aborted) or any(r is not None for r in self._slots)

    def num_running(self) -> int:
        return sum(r is not None for r in self._slots)

    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # ---- the step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Drop aborted requests, slide the ones whose cache row is full (prefill of the most
        recent part and a token), decode one token for every running request, then admit
        waiting ones into the free slots (prefill and first token)."""
        deltas = self._drop_aborted()
        deltas += self._slide()
        running = [r for r in self._slots if r is not None]
        if running:
            deltas += self._speculate(running) if self.draft is not None else self._decode(running)
        return deltas + self._admit()

    def _drop_aborted(self) -> list[Delta]:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            kept = deque(r for r in self._waiting if r.id not in aborted)
            deltas = [Delta(r.id, [], "", finish_reason="abort") for r in self._waiting if r.id in aborted]
            self._waiting = kept
        for r in self._slots:
            if r is not None and r.id in aborted:
                self._release(r)
                deltas.append(Delta(r.id, [], "", finish_reason="abort"))
        return deltas

    def _admit(self) -> list[Delta]:
        """Give waiting requests the free slots, and prefill them in groups of neighbouring slots."""
        deltas, admitted = [], []
        for slot, occupant in enumerate(self._slots):
            if occupant is not None:
                continue
            with self._lock:
                request = self._waiting.popleft() if self._waiting else None
            while request is not None and request.max_new_tokens == 0:
                deltas.append(Delta(request.id, [], "", finish_reason="length"))
                with self._lock:
                    request = self._waiting.popleft() if self._waiting else None
            if request is None:
                break
            request.slot = slot
            self._slots[slot] = request
            try:
                self.sampler.set_slot(slot, request.params, request.prompt_ids)
            except Exception as e:  # e.g. a parameter the sampler's tensors cannot hold
                deltas.append(self._fail(request, e))
                continue
            admitted.append(request)
        for group in _prefill_groups(admitted):
            try:
                deltas += self._prefill(group)
            except Exception as e:  # these prompts only (e.g. out of memory for a long one)
                deltas += [self._fail(r, e) for r in group if self._slots[r.slot] is r]
        return deltas

    def _slide(self) -> list[Delta]:
        """Requests whose cache row is full keep their most recent `slide_keep` tokens, which
        are prefilled from position 0 (in groups, as prompts are); each gets its next token."""
        full = [r for r in self._slots if r is not None and r.position >= self.max_len]
        deltas = []
        for r in full:
            r.window_start = len(r.prompt_ids) + len(r.output_ids) - self.slide_keep
        for group in _prefill_groups(full):
            try:
                deltas += self._prefill(group)
            except Exception as e:  # these requests only
                deltas += [self._fail(r, e) for r in group if self._slots[r.slot] is r]
        for delta in deltas:
            delta.slid = delta.finish_reason != "error"
        return deltas

    def _prefill(self, group: list[_Request]) -> list[Delta]:
        """Run the windows (prompts, or the most recent part of a full row) of requests in
        neighbouring slots through the model in one padded batch, writing their cache rows;
        sample each one's next token."""
        start = group[0].slot
        prompts = [r.window() for r in group]
        logits = self._prefill_cache(start, prompts)
        if self.draft is not None:
            self.draft._prefill_cache(start, prompts)
        next_ids, records, errors = self.sampler.sample(logits, start)
        self.sampler.observe(start, next_ids)
        rows = slice(start, start + len(group))
        self._tokens[rows, 0] = next_ids
        self._positions[rows, 0] = torch.tensor([len(p) for p in prompts], device=self.device)
        self._live[rows] = 1
        deltas = []
        for r, token, record, prompt in zip(group, next_ids.tolist(), records, prompts):
            r.position = len(prompt)
            deltas.append(self._accept(r, token, record, errors.get(r.slot - start)))
        return deltas

    def _prefill_cache(self, start: int, prompts: list[list[int]]) -> torch.Tensor:
        """Write right-padded prompts into cache rows start..; logits (n, V) at each last token.

        Padding tokens write keys past their row's prompt; those slots are overwritten by the
        row's own next tokens before any query of the row can see them."""
        n, longest = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros(n, longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        rows = self.cache.rows(start, start + n)
        rows.kv_len = longest
        positions = self._arange[:longest].expand(n, -1)
        hidden = self.model.hidden_states(tokens.to(self.device), positions, cache=rows)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self.model.lm_head(hidden[torch.arange(n, device=self.device), last])

    def _decode(self, running: list[_Request]) -> list[Delta]:
        """One token for every running request: rows 0..hi of the cache in one forward."""
        started = time.perf_counter()
        hi = max(r.slot for r in running) + 1
        if self._static_decode:  # one shape every step: the captured graph is replayed
            self.cache.kv_len = self.max_len
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
            logits = self._decode_model(self._tokens, self._positions, cache=self.cache)[:hi, -1]
        else:
            self.cache.kv_len = max(r.position for r in running) + 1
            with self._compile_config():
                logits = self._decode_model(self._tokens[:hi], self._positions[:hi], cache=self.cache)[:, -1]
        next_ids, records, errors = self.sampler.sample(logits, 0)
        self.sampler.observe(0, next_ids)
        self._tokens[:hi, 0] = next_ids
        self._positions[:hi] += self._live[:hi]
        ids = next_ids.tolist()  # waits for the device: the step's time is complete
        times = self._step_times.setdefault(hi, [0, 0.0])
        times[0] += 1
        times[1] += time.perf_counter() - started
        deltas = []
        for r in running:
            r.position += 1
            deltas.append(self._accept(r, ids[r.slot], records[r.slot], errors.get(r.slot)))
        return deltas

    def _speculate(self, running: list[_Request]) -> list[Delta]:
        """Speculative greedy decoding: the draft proposes k tokens per row (k small steps),
        the model checks them all in one forward, and each row keeps the proposals up to the
        first disagreement plus the model's own next token. Every kept token is the model's
        greedy choice, so the text is exactly that of plain greedy decoding.

        Near the end of a row, the draft's positions are clamped to its last slot, and the
        model's inputs past that slot repeat the one at it (so every write there is the same
        key); a row keeps only tokens predicted from positions inside the row, so it fills
        the row exactly as plain decoding does and slides at the same token."""
        k, last, draft = self.num_speculative_tokens, self.max_len - 1, self.draft
        hi = max(r.slot for r in running) + 1
        by_slot = {r.slot: r for r in running}
        sequences = {r.slot: r.window() for r in running}
        start = [by_slot[i].position if i in by_slot else 1 for i in range(hi)]
        top = max(start)
        # The draft first catches up on the last two tokens (the one before may be new to it
        # when all of its previous proposals were kept; recomputing a known one is harmless).
        pairs = [sequences[i][p - 1 : p + 1] if i in by_slot else [0, 0] for i, p in enumerate(start)]
        base = torch.tensor(start, device=self.device)[:, None]
        draft.cache.kv_len = min(top + k, self.max_len)
        tokens = torch.tensor(pairs, device=self.device)
        proposal = draft.model(tokens, base + self._arange[:2] - 1, cache=draft.cache)[:, -1].argmax(-1)
        proposals = [proposal]
        for j in range(1, k):
            positions = (base + j).clamp(max=last)
            proposals.append(draft.model(proposals[-1][:, None], positions, cache=draft.cache)[:, -1].argmax(-1))
        proposed = torch.stack(proposals, dim=1)
        current = torch.tensor([sequences[i][p] if i in by_slot else 0 for i, p in enumerate(start)], device=self.device)
        self.cache.kv_len = min(top + k + 1, self.max_len)
        inputs = (base + self._arange[: k + 1]).clamp(max=last) - base  # the input at each index
        tokens = torch.cat([current[:, None], proposed], 1).gather(1, inputs)
        verified = self.model(tokens, base + inputs, cache=self.cache).argmax(-1)
        proposed, verified = proposed.tolist(), verified.tolist()
        deltas = []
        for r in running:
            d, g = proposed[r.slot], verified[r.slot]
            n, inside = 0, min(k, last - r.position)  # g[i] is predicted from position r.position + i
            while n < inside and d[n] == g[n]:
                n += 1
            self.speculation["proposed"] += inside
            self.speculation["accepted"] += n
            for token in d[:n] + [g[n]]:
                r.position += 1
                deltas.append(self._accept(r, token, None))
                if deltas[-1].finish_reason is not None:
                    break
        return deltas

    def _accept(self, r: _Request, token: int, record: TokenLogprob | None, error: str | None = None) -> Delta:
        """Append a sampled token to its request: text, stop checks, and maybe finish (or
        fail the request alone, if its token could not be sampled or its text decoded)."""
        if error is not None:
            return self._fail(r, error)
        try:
            return self._append(r, token, record)
        except Exception as e:
            return self._fail(r, e)

    def _fail(self, r: _Request, error: Exception | str) -> Delta:
        """End one request with finish_reason 'error', freeing its slot."""
        if self._slots[r.slot] is r:
            self._release(r)
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return Delta(r.id, [], "", finish_reason="error", error=message)

    def _append(self, r: _Request, token: int, record: TokenLogprob | None) -> Delta:
        r.output_ids.append(token)
        finish = None
        if token in r.stop_ids:
            finish, text = "stop", ""
        else:
            text = r.stops.feed(r.detokenizer.push(token)) if r.detokenizer is not None else ""
            if r.stops.stopped:
                finish = "stop"
            elif len(r.output_ids) >= r.max_new_tokens:
                finish = "length"
        if finish is not None:
            if not r.stops.stopped and r.detokenizer is not None:
                text += r.stops.feed(r.detokenizer.flush())
                text += "" if r.stops.stopped else r.stops.flush()
            self._release(r)
        return Delta(r.id, [token], text, [record] if record is not None else [], finish)

    def _release(self, r: _Request) -> None:
        self._slots[r.slot] = None
        self.sampler.clear_slot(r.slot)
        self._live[r.slot] = 0
        self._positions[r.slot] = 0

    def warm_up(self) -> None:
        """Run the decode step once for one row and once for several, so that a compiled
        engine compiles now rather than on its first requests (one row is its own graph);
        a compiled engine's compile time is measured (`compile_seconds`) and reported."""
        started = time.perf_counter()
        params = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
        for rows in sorted({1, min(2, self.max_batch_size)}):
            self.generate([[0]] * rows, params)  # token 0: in every vocabulary
        self._step_times.clear()  # warm-up steps are not the engine's speed
        if self.compiled and self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - started
            self.kernels.add(Choice("compiled decode", "on", "measured", {"compile": self.compile_seconds},
                                    note=f"compiled in {self.compile_seconds:.1f} s"))

    def record_speed(self) -> None:
        """Remember this engine's measured decode-step times (and compile time) on this machine,
        for later decisions on whether compiling pays (`ling.kernels.compile_decision`)."""
        if not self._owned or self.draft is not None or self.kernels.mode == "reference":
            return
        for rows, (steps, seconds) in self._step_times.items():
            if steps < 8:  # too few to say
                continue
            values = {"compiled_step" if self.compiled else "eager_step": seconds / steps}
            if self.compiled and self.compile_seconds is not None:
                values["compile"] = self.compile_seconds
            compile_decision.remember(self.device, compile_decision.shape_key(self.cfg, self.dtype, rows), **values)

    # ---- whole requests -----------------------------------------------------------------------
    def stream(self, prompts: Sequence[str | Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[tuple[int, Delta]]:
        """Generate for every prompt, yielding (prompt index, delta) as tokens come.

        More prompts than `max_batch_size` are queued and join as earlier ones finish.
        Leaving the loop early aborts what is still running."""
        params_list = _per_prompt(params, len(prompts))
        index = {self.add_request(p, sp): i for i, (p, sp) in enumerate(zip(prompts, params_list))}
        unfinished = set(index)
        try:
            while unfinished:
                for delta in self.step():
                    if delta.request_id in index:
                        if delta.finish_reason is not None:
                            unfinished.discard(delta.request_id)
                        yield index[delta.request_id], delta
        finally:
            if unfinished:
                for request_id in unfinished:
                    self.abort(request_id)
                self.step()

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Generate for every prompt (batched); one `Completion` per prompt, in order."""
        prompts = [self.encode_prompt(p) for p in prompts]
        parts: list[list[Delta]] = [[] for _ in prompts]
        for i, delta in self.stream(prompts, params):
            parts[i].append(delta)
        return [Completion.from_deltas(deltas, len(prompt)) for deltas, prompt in zip(parts, prompts)]


def _prefill_groups(requests: list[_Request]) -> list[list[_Request]]:
    """Requests in consecutive slots, grouped for one padded prefill each, as long as padding
    stays under half the group's tokens (very different lengths are prefilled apart)."""
    groups: list[list[_Request]] = []
    for r in requests:
        group = groups[-1] if groups else None
        if group and group[-1].slot + 1 == r.slot:
            lengths = [len(x.window()) for x in group] + [len(r.window())]
            if max(lengths) * len(lengths) <= 2 * sum(lengths):
                group.append(r)
                continue
        groups.append([r])
    return groups


def _per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise LingError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
