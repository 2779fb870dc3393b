"""`Qwen2ForCausalLM` (Qwen2, Qwen2.5) ⇄ ling: Llama's layout with biases on q, k and v.

The small Qwen2.5 sizes tie the LM head to the embedding. Qwen's optional sliding window
(`use_sliding_window`) is refused when it would take effect, since ling attends fully.
"""

from __future__ import annotations

from ling.config import ModelConfig
from ling.hf.family import Family, HFConfig, check_sliding_window
from ling.hf.llama import (
    LLAMA_LIKE_IGNORED,
    LLAMA_LIKE_REQUIREMENTS,
    llama_like_config,
    llama_like_hf_config,
    llama_modules,
)

# transformers' Qwen2Config defaults, for keys a config.json leaves out.
DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "use_sliding_window": False,
    "sliding_window": 4096, "max_window_layers": 28,
}


def check_qwen_sliding_window(hf: HFConfig) -> None:
    """Qwen applies its window only with `use_sliding_window`, and only to some layers."""
    if not hf["use_sliding_window"]:
        return
    window = hf.data.get("sliding_window", hf.defaults["sliding_window"])
    layer_types = hf.data.get("layer_types") or [
        "sliding_attention" if i >= hf["max_window_layers"] else "full_attention"
        for i in range(hf["num_hidden_layers"])
    ]
    check_sliding_window(hf, window, layers_sliding="sliding_attention" in layer_types)


def qwen_hf_config(cfg: ModelConfig) -> dict:
    return {**llama_like_hf_config(cfg), "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.n_layer}


def config_from_hf(data: dict, where: str) -> ModelConfig:
    hf = HFConfig(data, DEFAULTS, where)
    check_qwen_sliding_window(hf)
    return llama_like_config(hf, "qwen2", bias="qkv")


FAMILY = Family(
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    prefix="model.",
    config_from_hf=config_from_hf,
    config_to_hf=qwen_hf_config,
    requirements={**LLAMA_LIKE_REQUIREMENTS, "bias='qkv'": lambda c: c.bias == "qkv",
                  "qk_norm=False": lambda c: not c.qk_norm},
    modules=llama_modules,
    ignored=LLAMA_LIKE_IGNORED,
)
