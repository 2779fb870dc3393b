"""LoRA: zero-init equivalence, which weights train, fused-qkv slices, merge equivalence."""

import copy
import dataclasses

import pytest
import torch

from ling.config import ModelConfig
from ling.errors import LingError
from ling.lora import LoRAConfig, LoRALinear, adapter_state_dict, apply_lora, load_adapter_state_dict, merge_lora
from ling.model import build_model


def _model(**overrides):
    return build_model(ModelConfig.from_name("tiny", **overrides)).eval()


def _perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


TOKENS = torch.tensor([[1, 5, 9, 2, 7, 120, 3], [4, 4, 121, 8, 0, 6, 2]])


def test_step_zero_equals_the_base_and_only_adapters_train():
    model = _model()
    base = model(TOKENS).detach()
    base_names = {n for n, _ in model.named_parameters()}
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0), train_token_ids=[120, 121])
    torch.testing.assert_close(model(TOKENS), base, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not trainable & base_names
    assert all(".lora_" in n or n == "embed.parametrizations.weight.0.values" for n in trainable)
    # 7 targets per block: A is rank × in, B is out-slice × rank
    cfg = model.cfg
    q, kv, d, h = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_embd, cfg.mlp_hidden
    per_block = 4 * (d + q) + 4 * (d + kv) * 2 + 4 * (q + d) + 4 * (d + h) * 2 + 4 * (h + d)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == cfg.n_layer * per_block + 2 * d
    loss = model(TOKENS).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_a_target_on_the_fused_qkv_changes_only_its_rows():
    model = _model()
    apply_lora(model, LoRAConfig(rank=2, targets="k", dropout=0.0))
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and set(qkv.lora_A) == {"k"}
    _perturb_adapters(model)
    x = torch.randn(3, 32)
    delta = qkv(x) - torch.nn.functional.linear(x, qkv.weight)
    q, kv = 32, 16
    assert delta[:, :q].abs().max() == 0 and delta[:, q + kv:].abs().max() == 0
    assert delta[:, q:q + kv].abs().max() > 0
    torch.testing.assert_close(delta, x @ qkv.delta_weight().T)


@pytest.mark.parametrize("tie", [True, False])
def test_merged_model_equals_base_plus_adapter(tie):
    model = _model(tie_embeddings=tie)
    apply_lora(model, LoRAConfig(rank=4, targets="q,v,o,up,down", dropout=0.1), train_token_ids=[120, 121])
    _perturb_adapters(model)
    model.eval()
    with torch.no_grad():
        expected = model(TOKENS)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert (merged.lm_head.weight is merged.embed.weight) == tie
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS), expected)
    # the merged model is a plain Transformer: same parameter names and layer types as a fresh one
    fresh = _model(tie_embeddings=tie)
    assert set(merged.state_dict()) == set(fresh.state_dict())
    assert [type(m) for m in merged.modules()] == [type(m) for m in fresh.modules()]


def test_adapter_state_round_trip_and_mismatch_errors():
    model = _model()
    other = apply_lora(copy.deepcopy(model), LoRAConfig(rank=4, targets="q,v"), train_token_ids=[120])
    apply_lora(model, LoRAConfig(rank=4, targets="q,v"), train_token_ids=[120])
    _perturb_adapters(model)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    load_adapter_state_dict(other, state, "adapter")
    model.eval(), other.eval()
    torch.testing.assert_close(other(TOKENS), model(TOKENS), rtol=0, atol=0)
    with pytest.raises(LingError, match="adapter: unexpected adapter tensor 'blocks.0.attn.qkv.lora_A.q'"):
        load_adapter_state_dict(apply_lora(_model(), LoRAConfig(rank=4, targets="v"), [120]), state, "adapter")
    with pytest.raises(LingError, match=r"has shape \(4, 32\), expected \(2, 32\)"):
        load_adapter_state_dict(apply_lora(_model(), LoRAConfig(rank=2, targets="q,v"), [120]), state, "adapter")


def test_all_targets_are_the_projections_the_model_has():
    gelu = build_model(ModelConfig.from_name("shakespeare-char", n_layer=1))
    apply_lora(gelu, LoRAConfig(targets="all"))
    assert set(gelu.blocks[0].attn.qkv.lora_A) == {"q", "k", "v"} and set(gelu.blocks[0].mlp.up.lora_A) == {"up"}
    assert not hasattr(gelu.blocks[0].mlp, "gate")
    swiglu = apply_lora(_model(), LoRAConfig(targets="all"))
    assert set(swiglu.blocks[0].mlp.gate.lora_A) == {"gate"}


def test_bad_lora_settings():
    with pytest.raises(LingError, match="unknown target.*qq.*choose from q, k, v, o, gate, up, down"):
        apply_lora(_model(), LoRAConfig(targets="q,qq"))
    with pytest.raises(LingError, match="'gate' needs a SwiGLU MLP"):
        apply_lora(build_model(dataclasses.replace(ModelConfig.from_name("shakespeare-char"), mlp="gelu")),
                   LoRAConfig(targets="gate"))
    with pytest.raises(LingError, match="rank must be positive"):
        apply_lora(_model(), LoRAConfig(rank=0))
