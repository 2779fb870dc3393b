"""The explicit attention paths (CPU) compute what scaled_dot_product_attention does."""

import pytest
import torch
import torch.nn.functional as F

from ling.config import ModelConfig
from ling.model import block_causal_mask, build_model, explicit_attention, single_query_attention


def qkv(h_kv=4, T=12):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, T, 8, generator=g), torch.randn(2, h_kv, T, 8, generator=g),
            torch.randn(2, h_kv, T, 8, generator=g))


@pytest.mark.parametrize("h_kv", [4, 2])
def test_causal_and_grouped_heads_match_sdpa_in_value_and_gradient(h_kv):
    inputs = [t.requires_grad_() for t in qkv(h_kv)]
    expected = F.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=h_kv != 4)
    got = explicit_attention(*inputs)  # causal halves: the first half of the keys used twice
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    for name, g, e in zip("qkv", torch.autograd.grad((got * weights).sum(), inputs), expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("rows", [2, 1])  # a mask per row, or one for the whole batch
def test_a_block_causal_mask_matches_sdpa(rows):
    q, k, v = qkv()
    mask = block_causal_mask(torch.tensor([[0] * 5 + [1] * 7, [0] * 12]))[:rows]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(explicit_attention(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)


def test_bf16_on_cpu_takes_it_and_stays_close_to_fp32(monkeypatch):
    import ling.model

    calls = []
    monkeypatch.setattr(ling.model, "explicit_attention", lambda *a: calls.append(1) or explicit_attention(*a))
    model = build_model(ModelConfig.from_name("tiny"))
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = model(tokens)
    assert calls == []  # fp32: scaled_dot_product_attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert len(calls) == model.cfg.n_layer
    assert (logits.float() - reference).abs().max() < 0.05


@pytest.mark.parametrize("h_kv", [4, 2])
def test_single_query_attention_over_a_cache_matches_sdpa(h_kv):
    """The compiled decode step's attention: one query per row, each row with its own mask."""
    q, k, v = qkv(h_kv)
    q = q[:, :, -1:]
    mask = torch.tensor([[True] * 12, [True] * 7 + [False] * 5])[:, None, None]  # row 1 is 7 long
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=h_kv != 4)
    torch.testing.assert_close(single_query_attention(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)
