"""`Qwen3ForCausalLM` ⇄ ling: Llama's layout with RMSNorm over each q and k head (QK-norm)
and a head size given explicitly (`head_dim`, 128 when absent, not hidden_size / heads)."""

from __future__ import annotations

from ling.config import ModelConfig
from ling.hf.family import Family, HFConfig
from ling.hf.llama import LLAMA_LIKE_IGNORED, LLAMA_LIKE_REQUIREMENTS, llama_like_config, llama_modules
from ling.hf.qwen2 import DEFAULTS as QWEN2_DEFAULTS
from ling.hf.qwen2 import check_qwen_sliding_window, qwen_hf_config

# transformers' Qwen3Config defaults, for keys a config.json leaves out.
DEFAULTS = {**QWEN2_DEFAULTS, "head_dim": 128, "attention_bias": False}


def config_from_hf(data: dict, where: str) -> ModelConfig:
    hf = HFConfig(data, DEFAULTS, where)
    if hf["attention_bias"]:  # Qwen3 would put it on q, k, v *and* o, a combination ling does not have
        raise hf.unsupported("attention_bias=true", "attention_bias=false (Qwen3 as released)")
    check_qwen_sliding_window(hf)
    return llama_like_config(hf, "qwen3", qk_norm=True)


def config_to_hf(cfg: ModelConfig) -> dict:
    return {**qwen_hf_config(cfg), "attention_bias": False}


FAMILY = Family(
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    prefix="model.",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    requirements={**LLAMA_LIKE_REQUIREMENTS, "bias='none'": lambda c: c.bias == "none",
                  "qk_norm=True": lambda c: c.qk_norm},
    modules=llama_modules,
    ignored=LLAMA_LIKE_IGNORED,
)
