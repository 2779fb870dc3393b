"""Growing a model's vocabulary for tokens a fine-tuning run adds (e.g. the ChatML markers)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ling.model import Transformer


@torch.no_grad()
def resize_vocab(model: Transformer, vocab_size: int) -> None:
    """Give `model` `vocab_size` token rows (in place; only growing).

    New rows start at the mean of the existing ones — of the embedding, and of an untied LM
    head — so a new token begins as an "average" token rather than as noise that would
    disturb the logits of every other token.
    """
    old = model.cfg.vocab_size
    if vocab_size <= old:
        return
    embed = model.embed.weight
    grown = torch.cat([embed, embed.mean(0, keepdim=True).expand(vocab_size - old, -1)])
    model.embed = nn.Embedding(vocab_size, embed.shape[1], device=embed.device, dtype=embed.dtype)
    model.embed.weight = nn.Parameter(grown, requires_grad=embed.requires_grad)
    if model.cfg.tie_embeddings:
        head = model.embed.weight
    else:
        w = model.lm_head.weight
        head = nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - old, -1)]), requires_grad=w.requires_grad)
    model.lm_head = nn.Linear(embed.shape[1], vocab_size, bias=False, device="meta")
    model.lm_head.weight = head
    model.cfg.vocab_size = vocab_size
