"""`MistralForCausalLM` ⇄ ling: Llama's layout plus a sliding attention window.

ling attends over the whole context, so a window is accepted only where it never takes
effect (null, or at least `max_position_embeddings`, as in Mistral 7B v0.2 and later).
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

# transformers' MistralConfig defaults, for keys a config.json leaves out.
DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "sliding_window": 4096,
}


def config_from_hf(data: dict, where: str) -> ModelConfig:
    hf = HFConfig(data, DEFAULTS, where)
    check_sliding_window(hf, data.get("sliding_window", DEFAULTS["sliding_window"]))
    return llama_like_config(hf, "mistral")


def config_to_hf(cfg: ModelConfig) -> dict:
    return {**llama_like_hf_config(cfg), "sliding_window": None}


FAMILY = Family(
    architecture="MistralForCausalLM",
    model_type="mistral",
    prefix="model.",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    requirements={**LLAMA_LIKE_REQUIREMENTS, "bias='none'": lambda c: c.bias == "none",
                  "qk_norm=False": lambda c: not c.qk_norm},
    modules=llama_modules,
    ignored=LLAMA_LIKE_IGNORED,
)
