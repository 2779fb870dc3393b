"""`LlamaForCausalLM` (Llama 1/2/3, TinyLlama, SmolLM2, …) ⇄ ling.

Llama is also the base of Mistral, Qwen2 and Qwen3: they share its tensor names and
most of its config keys, so their modules call `llama_like_config` / `llama_like_hf_config`
/ `llama_modules` with what differs (biases, QK-norm, sliding windows, defaults).
"""

from __future__ import annotations

from ling.config import ModelConfig
from ling.hf.family import Family, HFConfig, HFModule, rope_from_hf, rope_to_hf

# transformers' LlamaConfig defaults, for keys a config.json leaves out.
DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
}

LLAMA_LIKE_REQUIREMENTS = {
    "norm='rmsnorm'": lambda c: c.norm == "rmsnorm",
    "mlp='swiglu'": lambda c: c.mlp == "swiglu",
    "position='rope'": lambda c: c.position == "rope",
}


def llama_like_config(hf: HFConfig, name: str, bias: str = "none", qk_norm: bool = False) -> ModelConfig:
    """The ModelConfig of a Llama-shaped checkpoint (the caller decides biases and QK-norm)."""
    act = hf["hidden_act"]
    if act not in ("silu", "swish"):
        raise hf.unsupported(f"hidden_act '{act}'", "'silu' (SwiGLU)")
    theta, scaling = rope_from_hf(hf)
    n_head = hf["num_attention_heads"]
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        context_length=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=n_head,
        n_kv_head=hf["num_key_value_heads"] or n_head,
        head_dim=hf["head_dim"] or hf["hidden_size"] // n_head,
        mlp="swiglu",
        mlp_hidden=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=float(hf["rms_norm_eps"]),
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        bias=bias,
        qk_norm=qk_norm,
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        dropout=0.0,
    )


def llama_like_hf_config(cfg: ModelConfig) -> dict:
    """The config.json keys Llama, Mistral, Qwen2 and Qwen3 share."""
    return {
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "num_hidden_layers": cfg.n_layer,
        "hidden_size": cfg.n_embd,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.mlp_hidden,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope_to_hf(cfg),
    }


def llama_modules(cfg: ModelConfig) -> dict[str, HFModule]:
    modules: dict[str, HFModule] = {"embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}", f"model.layers.{i}"
        modules.update({
            f"{b}.attn_norm": f"{h}.input_layernorm",
            f"{b}.attn.qkv": (f"{h}.self_attn.q_proj", f"{h}.self_attn.k_proj", f"{h}.self_attn.v_proj"),
            f"{b}.attn.o": f"{h}.self_attn.o_proj",
            f"{b}.attn.q_norm": f"{h}.self_attn.q_norm",
            f"{b}.attn.k_norm": f"{h}.self_attn.k_norm",
            f"{b}.mlp_norm": f"{h}.post_attention_layernorm",
            f"{b}.mlp.gate": f"{h}.mlp.gate_proj",
            f"{b}.mlp.up": f"{h}.mlp.up_proj",
            f"{b}.mlp.down": f"{h}.mlp.down_proj",
        })
    return modules


LLAMA_LIKE_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
"""RoPE buffers that old transformers versions saved with the weights."""


def config_from_hf(data: dict, where: str) -> ModelConfig:
    hf = HFConfig(data, DEFAULTS, where)
    # Llama puts `attention_bias` on q, k, v and o, `mlp_bias` on the MLP: ling has none or all.
    attention_bias, mlp_bias = bool(hf["attention_bias"]), bool(hf["mlp_bias"])
    if attention_bias != mlp_bias:
        raise hf.unsupported(
            f"attention_bias={attention_bias} with mlp_bias={mlp_bias}", "both false (Llama) or both true"
        )
    return llama_like_config(hf, "llama", bias="all" if attention_bias else "none")


def config_to_hf(cfg: ModelConfig) -> dict:
    biased = cfg.bias == "all"
    return {**llama_like_hf_config(cfg), "attention_bias": biased, "mlp_bias": biased}


FAMILY = Family(
    architecture="LlamaForCausalLM",
    model_type="llama",
    prefix="model.",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    requirements={
        **LLAMA_LIKE_REQUIREMENTS,
        "bias='none' (or 'all')": lambda c: c.bias in ("none", "all"),
        "qk_norm=False": lambda c: not c.qk_norm,
    },
    modules=llama_modules,
    ignored=LLAMA_LIKE_IGNORED,
)
