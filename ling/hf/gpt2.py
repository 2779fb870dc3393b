"""`GPT2LMHeadModel` ⇄ ling: learned positions, LayerNorm, GELU-tanh MLP, biases everywhere.

GPT-2 keeps q, k and v in one `c_attn` layer already, in ling's [q|k|v] order, but its
Conv1D layers store weights as (in, out): the weight map transposes them. A ling model
trained without biases (nanoGPT's `bias=False`, the shakespeare-char preset) is GPT-2 with
zero biases, and is exported as such.
"""

from __future__ import annotations

import dataclasses

from ling.config import ModelConfig
from ling.hf.family import Family, HFConfig, HFModule

# transformers' GPT2Config defaults, for keys a config.json leaves out.
DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "tie_word_embeddings": True,
}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(data: dict, where: str) -> ModelConfig:
    hf = HFConfig(data, DEFAULTS, where)
    if hf["activation_function"] not in TANH_GELUS:
        raise hf.unsupported(f"activation_function '{hf['activation_function']}'", " or ".join(TANH_GELUS))
    if not hf["scale_attn_weights"] or hf["scale_attn_by_inverse_layer_idx"]:
        raise hf.unsupported("attention scaling other than 1/sqrt(head_dim)",
                             "scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false")
    if hf["add_cross_attention"]:
        raise hf.unsupported("cross-attention (add_cross_attention=true)", "decoder-only GPT-2")
    return ModelConfig(
        name="gpt2",
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_embd=hf["n_embd"],
        n_head=hf["n_head"],
        mlp="gelu",
        mlp_hidden=hf["n_inner"] or 4 * hf["n_embd"],
        norm="layernorm",
        norm_bias=True,
        norm_eps=float(hf["layer_norm_epsilon"]),
        position="learned",
        bias="all",
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        dropout=0.0,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "n_inner": cfg.mlp_hidden,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
    }


def modules(cfg: ModelConfig) -> dict[str, HFModule]:
    table: dict[str, HFModule] = {
        "embed": "transformer.wte", "pos_embed": "transformer.wpe", "final_norm": "transformer.ln_f",
        "lm_head": "lm_head",
    }
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}", f"transformer.h.{i}"
        table.update({
            f"{b}.attn_norm": f"{h}.ln_1",
            f"{b}.attn.qkv": f"{h}.attn.c_attn",
            f"{b}.attn.o": f"{h}.attn.c_proj",
            f"{b}.mlp_norm": f"{h}.ln_2",
            f"{b}.mlp.up": f"{h}.mlp.c_fc",
            f"{b}.mlp.down": f"{h}.mlp.c_proj",
        })
    return table


FAMILY = Family(
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    prefix="transformer.",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    requirements={  # any biases: those a ling model lacks are written as zeros (see `as_stored`)
        "norm='layernorm'": lambda c: c.norm == "layernorm",
        "mlp='gelu'": lambda c: c.mlp == "gelu",
        "position='learned'": lambda c: c.position == "learned",
        "n_kv_head == n_head (no GQA)": lambda c: c.n_kv_head == c.n_head,
        "head_dim == n_embd / n_head": lambda c: c.head_dim * c.n_head == c.n_embd,
        "qk_norm=False": lambda c: not c.qk_norm,
    },
    modules=modules,
    conv1d=True,
    as_stored=lambda cfg: dataclasses.replace(cfg, bias="all", norm_bias=True),
    # The causal-mask buffers that old GPT-2 checkpoints (e.g. the original `gpt2`) carry.
    ignored=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",),
)
