"""Test models whose greedy output is known in advance.

`scripted_model` sets the weights of a one-layer model so that the greedy next token
depends only on the current token, following a chain: after token t_i comes t_{i+1}. The
blocks are made the identity (their output projections are zero), so the logits are
`lm_head(norm(embed[t]))`, and each chain link's head row points along its predecessor's
embedding. Greedy decoding from a prompt ending in t_0 then writes the chain out, which
lets tests check streaming, stop strings and stop tokens against an exact expected text.
"""

from __future__ import annotations

import torch

from ling.config import ModelConfig
from ling.model import build_model
from ling.tokenizer import Tokenizer

SCRIPT = "Ab世界🎉é XYZ"
"""a text whose bytes are all different: as pure byte tokens it is a valid chain, and its
Chinese characters (3 bytes), emoji (4) and é (2) are each split across tokens"""


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: every byte is a token, so multi-byte characters split."""
    return Tokenizer.train_bpe(["unused"], vocab_size=259)


def scripted_model(tokenizer: Tokenizer, chain: list[int], context_length: int = 64):
    """A model whose greedy continuation of chain[0] is chain[1:] (chain ids must be distinct)."""
    assert len(set(chain)) == len(chain), "a token can have only one successor"
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, context_length=context_length, n_layer=1, n_embd=64, n_head=4,
        mlp="swiglu", norm="rmsnorm", position="rope", tie_embeddings=False,
    )
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.blocks[0].attn.o.weight.zero_()
        model.blocks[0].mlp.down.weight.zero_()
        embed = torch.randn(cfg.vocab_size, cfg.n_embd, generator=torch.Generator().manual_seed(0))
        model.embed.weight.copy_(embed)
        model.lm_head.weight.zero_()
        for current, successor in zip(chain, chain[1:]):
            model.lm_head.weight[successor] = 10 * embed[current] / embed[current].norm()
    return model


def cycle_model(tokenizer: Tokenizer, text: str, context_length: int = 64):
    """A model whose greedy continuation of text[0] is text[1:], text[0], text[1:], ... forever
    (the characters of `text` must be distinct single-byte tokens)."""
    chain = tokenizer.encode(text, add_special_tokens=False)
    model = scripted_model(tokenizer, chain, context_length)
    with torch.no_grad():
        embed = model.embed.weight
        model.lm_head.weight[chain[0]] = 10 * embed[chain[-1]] / embed[chain[-1]].norm()
    return model
