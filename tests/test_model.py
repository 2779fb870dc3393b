"""The transformer: causality, GQA, KV-cache decoding, parameter counts, presets, meta build."""

import dataclasses

import pytest
import torch

from ling.config import PRESETS, ModelConfig, RopeScaling
from ling.model import KVCache, block_causal_mask, build_model

VARIANTS = {
    "gpt2-like": ModelConfig(vocab_size=61, context_length=32, n_layer=2, n_embd=32, n_head=4, bias="all"),
    "llama-gqa": ModelConfig(
        vocab_size=61, context_length=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp="swiglu",
        mlp_hidden=48, norm="rmsnorm", position="rope", tie_embeddings=False,
    ),
    "qwen3-like": ModelConfig(
        vocab_size=61, context_length=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=1, head_dim=16,
        mlp="swiglu", mlp_hidden=48, norm="rmsnorm", position="rope", qk_norm=True, bias="qkv",
        rope_scaling=RopeScaling(factor=8.0, original_context_length=16),
    ),
    "nobias-layernorm": ModelConfig(vocab_size=61, context_length=32, n_layer=1, n_embd=24, n_head=3, norm_bias=False),
}


@pytest.fixture(params=list(VARIANTS))
def cfg(request):
    return VARIANTS[request.param]


def test_causal_changing_a_token_never_changes_earlier_logits(cfg):
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    changed = tokens.clone()
    t = 9
    changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_cfg = VARIANTS["llama-gqa"]
    mha_cfg = dataclasses.replace(gqa_cfg, n_kv_head=gqa_cfg.n_head)
    gqa, mha = build_model(gqa_cfg).eval(), build_model(mha_cfg).eval()
    sd = gqa.state_dict()
    rep = gqa_cfg.n_head // gqa_cfg.n_kv_head
    hd, q_size, kv_size = gqa_cfg.head_dim, gqa_cfg.n_head * gqa_cfg.head_dim, gqa_cfg.n_kv_head * gqa_cfg.head_dim
    for i in range(gqa_cfg.n_layer):
        w = sd[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([q_size, kv_size, kv_size])
        expand = lambda t: t.view(gqa_cfg.n_kv_head, hd, -1).repeat_interleave(rep, dim=0).reshape(q_size, -1)
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, expand(k), expand(v)])
    mha.load_state_dict(sd)
    tokens = torch.randint(0, gqa_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens))


def test_incremental_decoding_with_cache_equals_full_forward(cfg):
    model = build_model(cfg).eval()
    B, T, prefill = 2, 14, 5
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    cache = KVCache(cfg, batch_size=B, max_len=T)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :prefill], torch.arange(prefill).expand(B, -1), cache=cache)]
        for t in range(prefill, T):
            steps.append(model(tokens[:, t : t + 1], torch.full((B, 1), t), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_cache_rows_at_different_positions_decode_independently():
    """Two sequences of different lengths in one cache: each equals its own full forward."""
    cfg = VARIANTS["llama-gqa"]
    model = build_model(cfg).eval()
    short, long = torch.randint(0, cfg.vocab_size, (1, 4)), torch.randint(0, cfg.vocab_size, (1, 9))
    cache = KVCache(cfg, batch_size=2, max_len=16)
    padded = torch.cat([torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1), long])
    with torch.no_grad():
        logits = model(padded, torch.arange(9).expand(2, -1), cache=cache)
        torch.testing.assert_close(logits[0, :4], model(short)[0])
        torch.testing.assert_close(logits[1], model(long)[0])
        # Next token for each row at its own position (4 and 9).
        nxt = torch.tensor([[7], [11]])
        step = model(nxt, torch.tensor([[4], [9]]), cache=cache)
        torch.testing.assert_close(step[0, 0], model(torch.cat([short, nxt[:1]], 1))[0, -1])
        torch.testing.assert_close(step[1, 0], model(torch.cat([long, nxt[1:]], 1))[0, -1])


def test_block_causal_mask_isolates_packed_documents():
    cfg = VARIANTS["llama-gqa"]
    model = build_model(cfg).eval()
    a, b = torch.randint(0, cfg.vocab_size, (1, 5)), torch.randint(0, cfg.vocab_size, (1, 7))
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        out = model(packed, positions, mask=block_causal_mask(doc_ids))
        torch.testing.assert_close(out[:, :5], model(a))
        torch.testing.assert_close(out[:, 5:], model(b))


def test_parameter_count_matches_closed_form(cfg):
    assert build_model(cfg).num_params() == cfg.num_params()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_with_its_closed_form_size(name):
    cfg = ModelConfig.from_name(name)
    model = build_model(cfg, device="meta", init=False)
    assert model.num_params() == cfg.num_params()


def test_preset_sizes_are_what_their_names_say():
    assert ModelConfig.from_name("gpt2").num_params() == 124_439_808  # HF GPT2LMHeadModel
    assert 105e6 < ModelConfig.from_name("llama-110m").num_params() < 115e6


def test_tiny_preset_runs_forward_and_backward():
    cfg = ModelConfig.from_name("tiny")
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # A freshly initialised model predicts close to uniformly.
    assert abs(loss.item() - torch.log(torch.tensor(cfg.vocab_size)).item()) < 0.2


def test_unknown_preset_suggests_the_closest_name():
    with pytest.raises(Exception, match="did you mean 'gpt2'"):
        ModelConfig.from_name("gtp2")


def test_tied_embeddings_share_storage_after_meta_build():
    model = build_model(VARIANTS["gpt2-like"])
    assert model.lm_head.weight is model.embed.weight


def test_flops_per_token_formula():
    cfg = ModelConfig(vocab_size=100, context_length=8, n_layer=2, n_embd=16, n_head=2)
    matmul = 2 * (16 * 48 + 16 * 16 + 2 * 16 * 64) + 100 * 16
    assert cfg.flops_per_token(8) == 6 * matmul + 12 * 2 * 2 * 8 * 8


def test_activation_checkpointing_gives_identical_gradients():
    cfg = VARIANTS["llama-gqa"]
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        model(tokens).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
