"""ling's model inside EleutherAI's lm-evaluation-harness: an `lm_eval` `LM` on ling's Engine.

The harness asks a model three things, and `LingLM` answers them with the semantics of
lm_eval's own `HFLM`, so scores are comparable with published ones:

- `loglikelihood(context, continuation)`: the summed log-probability of the continuation
  and whether greedy decoding would produce it. The pair is tokenized as a whole and split
  at the context's token length (`TemplateLM._encode_pair`); a pair longer than the
  context window loses tokens from the left.
- `loglikelihood_rolling(text)`: a whole document's log-likelihood, over disjoint windows of
  the context length (`lm_eval.utils.get_rolling_token_windows`).
- `generate_until(context, {until, max_gen_toks, ...})`: text generated until a stop
  sequence or the token budget, the context left-truncated to leave room for the answer.

Why it is faster than running a transformers model the same way: multiple-choice tasks score
several continuations of one context, and HFLM runs the context again for each. Here the
requests of a batch that share a context are grouped, the context is run once into the
engine's KV cache, copied to each continuation's cache row, and only the continuations are
run — when that computes much less than running every row whole (a short context is faster
run whole: the second pass and the copy have a cost of their own). Requests
whose model input is identical (one-token answers such as " A"/" B") share one row. Batches
are formed longest first, as lm_eval's `Collator` does, and logits are computed only at the
scored positions. Generation is the Engine's continuous batching, with its kernels.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from ling.device import pick_device
from ling.errors import LingError
from ling.infer.engine import Engine
from ling.infer.sampling import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256
"""as HFLM: the generation budget when a task gives none"""
SHARE_BELOW = 0.6
"""run shared contexts apart only when that computes at most this share of the token slots of
running every row whole: the second pass and the cache copy cost about as much as a few dozen
tokens, so short contexts are faster whole (measured: BENCHMARKS.md, Evaluation)"""


@dataclass
class _Row:
    """One sequence the model reads: a context and continuation, less the last token."""

    tokens: list[int]
    prefix: int
    """leading tokens that may come from a shared context's cache (the context less its last token)"""
    requests: list[tuple[int, list[int]]] = field(default_factory=list)
    """(request index, continuation): each scores the last len(continuation) positions"""


@register_model("ling")
class LingLM(TemplateLM):
    """lm_eval's `LM` interface on a ling checkpoint (any that `ling` opens) or a ready `Engine`.

    From lm_eval's own command line (ling imported first): `--model ling --model_args pretrained=DIR`."""

    def __init__(self, pretrained: str | Engine, batch_size: int | str = 8, device: str | None = None,
                 dtype: str | None = None, max_length: int | None = None, share_contexts: bool = True,
                 **kwargs):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise LingError(f"batch_size must be a whole number of sequences (got {batch_size!r})")
        batch_size = int(batch_size)
        if isinstance(pretrained, Engine):
            self.engine = pretrained
            batch_size = min(batch_size, pretrained.max_batch_size)
        else:
            self.engine = Engine(pretrained, device=pick_device(device or "auto"), dtype=dtype,
                                 max_batch_size=batch_size, max_len=max_length)
        if self.engine.tokenizer is None:
            raise LingError(f"{pretrained}: no tokenizer.json; lm-eval tasks are text and need the model's tokenizer")
        self.tokenizer = self.engine.tokenizer
        self.model = self.engine.model
        self._batch_size = batch_size
        self.share_contexts = share_contexts
        """run a context shared by several continuations of a batch once (False: every row whole, as HFLM)"""
        self.truncated = defaultdict(int)
        """requests whose context lost tokens from the left to fit the window, by request type"""
        self.contexts_shared = 0
        """contexts run once for several rows of a batch (so far)"""

    # ---- what TemplateLM needs ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """what an empty context is conditioned on (BOS, else EOS), as HFLM"""
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.engine.max_len

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.engine.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids as HFLM makes them: the tokenizer's special tokens (a BOS) unless the text
        already begins with the prefix token's text."""
        if add_special_tokens is None:
            prefix = self.tokenizer.decode([self.prefix_token_id]) if self.prefix_token_id is not None else None
            add_special_tokens = not (prefix and string.startswith(prefix))
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring ----------------------------------------------------------------------------
    def _rows(self, requests) -> tuple[list[_Row], int]:
        """Requests (_, context ids, continuation ids) → the distinct rows to run, and how many
        requests were truncated on the left to fit the window (as HFLM truncates)."""
        rows: dict[tuple[int, ...], _Row] = {}
        truncated = 0
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise LingError("a loglikelihood request needs a non-empty context and continuation")
            if len(continuation) > self.max_length:
                raise LingError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                                f"{self.max_length}-token context")
            whole = (context + continuation)[-(self.max_length + 1):]
            truncated += len(context) + len(continuation) > len(whole)
            tokens = tuple(whole[:-1])
            prefix = len(whole) - len(continuation) - 1  # the context (as left after truncation) less its last token
            row = rows.get(tokens)
            if row is None:
                row = rows[tokens] = _Row(list(tokens), prefix)
            row.prefix = min(row.prefix, prefix)
            row.requests.append((i, continuation))
        return list(rows.values()), truncated

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows longest first, those of one context together, cut into batches of `batch_size`."""
        by_context: dict[tuple[int, ...], list[_Row]] = defaultdict(list)
        for row in rows:
            by_context[tuple(row.tokens[: row.prefix])].append(row)
        groups = sorted(by_context.values(), key=lambda g: (-max(len(r.tokens) for r in g), g[0].tokens))
        ordered = [r for g in groups for r in sorted(g, key=lambda r: -len(r.tokens))]
        return [ordered[i: i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]

    @torch.inference_mode()
    def _hidden(self, batch: list[_Row]) -> tuple[torch.Tensor, list[int]]:
        """Final hidden states (rows, T, n_embd) of the rows' tokens from each row's start
        offset (returned): 0, or the length of a context shared with another row of the batch,
        which was run once into the cache."""
        model, device = self.model, self.device
        keys = [tuple(row.tokens[: row.prefix]) for row in batch]
        counts = defaultdict(int)
        for key in keys:
            counts[key] += 1
        shared = [key for key, n in counts.items() if n > 1 and key] if self.share_contexts else []
        starts = [len(key) if key in shared else 0 for key in keys]
        width = max(len(row.tokens) - s for row, s in zip(batch, starts))
        if shared:  # two passes (contexts, then the rest) only if they compute much less than one
            two_pass = len(shared) * max(map(len, shared)) + len(batch) * width
            if two_pass > SHARE_BELOW * len(batch) * max(len(row.tokens) for row in batch):
                shared, starts = [], [0] * len(batch)
                width = max(len(row.tokens) for row in batch)
        # A row ending at the window's last slot, with padding after it, would have its padding
        # written over its own slots: start it earlier (the extra tokens recompute cached ones).
        starts = [min(s, self.max_length - width) for s in starts]
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (row, s) in enumerate(zip(batch, starts)):
            tokens[i, : len(row.tokens) - s] = torch.tensor(row.tokens[s:])
        tokens = tokens.to(device)
        if not shared:  # every row whole: a plain causal forward, padding on the right
            return model.hidden_states(tokens), starts
        self.contexts_shared += len(shared)
        cache = self.engine.cache  # idle while scoring: lm_eval asks for one kind of request at a time
        index = {key: j for j, key in enumerate(shared)}
        longest = max(len(key) for key in shared)
        contexts = torch.zeros(len(shared), longest, dtype=torch.long)
        for key, j in index.items():
            contexts[j, : len(key)] = torch.tensor(key)
        view = cache.rows(0, len(shared))
        view.kv_len = longest
        arange = torch.arange(self.max_length, device=device)
        model.hidden_states(contexts.to(device), arange[:longest].expand(len(shared), -1), cache=view)
        source = torch.tensor([index.get(tuple(row.tokens[: row.prefix]), 0) for row in batch], device=device)
        for layer in range(len(cache.k)):  # each row's context, copied from the row it was run in
            cache.k[layer][: len(batch), :, :longest] = cache.k[layer][source, :, :longest]
            cache.v[layer][: len(batch), :, :longest] = cache.v[layer][source, :, :longest]
        view = cache.rows(0, len(batch))
        view.kv_len = min(max(starts) + width, self.max_length)
        positions = torch.tensor(starts, device=device)[:, None] + arange[:width]
        return model.hidden_states(tokens, positions, cache=view), starts

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows, truncated = self._rows(requests)
        self.truncated["loglikelihood"] += truncated
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for batch in self._batches(rows):
            hidden, starts = self._hidden(batch)
            picks, spans = [], []
            for i, (row, start) in enumerate(zip(batch, starts)):
                n = max(len(c) for _, c in row.requests)
                first = len(row.tokens) - n - start
                picks += [(i, first + t) for t in range(n)]
                spans.append((len(picks) - n, n))
            at = torch.tensor(picks, device=self.device)
            with torch.inference_mode():
                logprobs = torch.log_softmax(self.model.lm_head(hidden[at[:, 0], at[:, 1]]).float(), dim=-1)
            for row, (offset, n) in zip(batch, spans):
                for index, continuation in row.requests:
                    scored = logprobs[offset + n - len(continuation): offset + n]
                    target = torch.tensor(continuation, device=self.device)
                    value = float(scored.gather(1, target[:, None]).sum())
                    greedy = bool((scored.argmax(-1) == target).all())
                    results[index] = (value, greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], results[index])
                    bar.update(1)
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (value, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += value
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for every request on the Engine (continuous batching, longest first); the
        text is cut at the first stop sequence, as HFLM cuts it."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False) if self.eot_token_id is not None else None
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise LingError(f"the task asks for up to {max_gen_toks} generated tokens, but the model's "
                                f"context holds {self.max_length}")
            ids = self.tok_encode(context)
            if len(ids) > room:
                self.truncated["generate_until"] += 1
                ids = ids[-room:]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts.append(ids)
            params.append(SamplingParams(max_new_tokens=max_gen_toks, temperature=temperature,
                                         top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                                         stop=until))
            stops.append(until)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts = [""] * len(prompts)
        bar = tqdm(total=len(prompts), disable=disable_tqdm, desc="generate_until")
        tokens: dict[int, list[int]] = defaultdict(list)
        for position, delta in self.engine.stream([prompts[i] for i in order], [params[i] for i in order]):
            i = order[position]
            tokens[i] += delta.token_ids
            if delta.finish_reason is not None:
                if delta.finish_reason == "error":
                    raise LingError(f"generation failed: {delta.error}")
                texts[i] = postprocess_generated_text(self.tok_decode(tokens.pop(i)), stops[i], None)
                self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
                bar.update(1)
        bar.close()
        return texts
