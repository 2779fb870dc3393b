"""Token-by-token sampling from a model with its KV cache: the small, single-sequence path.

`generate_tokens` prefills the prompt once, then feeds one token per step, each attending
to the cached keys and values. Sampling uses its own `torch.Generator`, so the same seed
gives the same text whatever else uses the global RNG.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ling.errors import LingError
from ling.model import KVCache, Transformer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick next-token ids (B,) from logits (B, V): greedy at temperature 0, else sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled token ids after `prompt` (stops after a stop id)."""
    if not prompt:
        raise LingError("the prompt is empty: give at least one token")
    limit = model.cfg.context_length
    if len(prompt) >= limit:
        raise LingError(f"the prompt is {len(prompt)} tokens; this model's context is {limit} tokens")
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    was_training = model.training
    model.eval()
    try:
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.cfg, batch_size=1, max_len=len(prompt) + max_new_tokens, device=device, dtype=dtype)
        tokens = torch.tensor([prompt], device=device)
        positions = torch.arange(len(prompt), device=device)[None]
        for _ in range(max_new_tokens):
            logits = model(tokens, positions, cache=cache)[:, -1]
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            token = int(next_id)
            yield token
            if token in stop_ids:
                return
            tokens = next_id[:, None]
            positions = positions[:, -1:] + 1
    finally:
        model.train(was_training)
