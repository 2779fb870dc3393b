"""What a Hugging Face model family is to ling: config mapping both ways, and a weight map.

A `Family` is a handful of functions that each family module (`gpt2.py`, `llama.py`, …)
fills in. The weight map is derived here, once, from the family's module-name table, so
loading, exporting, tests and any other tool use the same names, splits and transposes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ling.config import ModelConfig, RopeScaling
from ling.errors import LingError
from ling.model import Transformer
from ling.weights import Source, WeightMap, model_shapes

HFModule = str | tuple[str, str, str]
"""An HF module name, or three (q, k, v) that ling fuses into one `attn.qkv` projection."""


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture (e.g. `LlamaForCausalLM`) and how it maps onto ling."""

    architecture: str
    model_type: str
    prefix: str
    """the base-model prefix of tensor names ('model.' / 'transformer.'); some files omit it"""
    config_from_hf: Callable[[dict, str], ModelConfig]
    """HF config.json (dict, file name for errors) → ModelConfig; LingError for an unsupported option"""
    config_to_hf: Callable[[ModelConfig], dict]
    """ModelConfig → the family's config.json keys (call only when `mismatches` is empty)"""
    requirements: dict[str, Callable[[ModelConfig], Any]]
    """what a ModelConfig must satisfy to be exported as this family: description → check"""
    modules: Callable[[ModelConfig], dict[str, HFModule]]
    """ling module name → HF module name(s)"""
    conv1d: bool = False
    """linear layers inside blocks are stored as (in, out), as GPT-2's Conv1D"""
    as_stored: Callable[[ModelConfig], ModelConfig] = lambda cfg: cfg
    """the config as this family always stores it: parameters a ling model lacks (GPT-2's
    biases, for a model trained without them) are exported as zeros, which is exact"""
    ignored: tuple[str, ...] = field(default=())
    """regexes of stored tensors that are buffers or duplicates, not weights (skipped on load)"""

    def mismatches(self, cfg: ModelConfig) -> list[str]:
        """Why `cfg` cannot be this family (empty: it can)."""
        return [need for need, ok in self.requirements.items() if not ok(cfg)]

    def weight_map(self, cfg: ModelConfig) -> WeightMap:
        """ling parameter → the HF tensors it is made of (see `ling.weights.Source`)."""
        modules = self.modules(cfg)
        q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        result: WeightMap = {}
        for name, shape in parameter_shapes(cfg).items():
            module, param = name.rsplit(".", 1)
            hf = modules[module]
            transposed = self.conv1d and name.startswith("blocks.") and len(shape) == 2
            if isinstance(hf, tuple):
                result[name] = tuple(
                    Source(f"{h}.{param}", rows, transposed) for h, rows in zip(hf, (q_rows, kv_rows, kv_rows))
                )
            else:
                result[name] = (Source(f"{hf}.{param}", shape[0], transposed),)
        return result

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(pattern, name) for pattern in self.ignored)


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The stored parameters of a ling model with this config (built on meta: no memory)."""
    with torch.device("meta"):
        return model_shapes(Transformer(cfg))


# ---- reading config.json -----------------------------------------------------------------
class HFConfig:
    """config.json values with the family's defaults for absent keys (transformers omits some)."""

    def __init__(self, data: dict, defaults: dict, where: str):
        self.data, self.defaults, self.where = data, defaults, where

    def __getitem__(self, key: str):
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        return self.defaults.get(key)

    def unsupported(self, what: str, supported: str) -> LingError:
        return LingError(f"{self.where}: {what} is not supported (ling supports {supported})")


def rope_from_hf(hf: HFConfig) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either spelling: transformers 5's `rope_parameters`, or the
    `rope_theta` + `rope_scaling` that transformers 4 writes (and most hub checkpoints have)."""
    new, legacy = hf.data.get("rope_parameters") or {}, hf.data.get("rope_scaling") or {}
    params = {**new, **legacy}
    theta = params.get("rope_theta", hf.data.get("rope_theta", hf.defaults.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.data.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise hf.unsupported(f"partial rotary embeddings (partial_rotary_factor={partial})",
                             "rotary embeddings over the whole head")
    kinds = {d.get("rope_type", d.get("type")) for d in (new, legacy)} - {None, "default"}
    for kind in sorted(kinds - {"llama3"}):
        raise hf.unsupported(f"rope_scaling of type '{kind}'", "no RoPE scaling, or rope_type 'llama3'")
    if not kinds:
        return float(theta), None
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_context_length=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise LingError(f"{hf.where}: llama3 rope scaling needs '{e.args[0]}'") from None
    return float(theta), scaling


def rope_to_hf(cfg: ModelConfig) -> dict:
    """`rope_theta` + `rope_scaling`: the spelling every transformers version (and vLLM, llama.cpp) reads."""
    out: dict = {"rope_theta": cfg.rope_theta, "rope_scaling": None}
    s = cfg.rope_scaling
    if s is not None:
        out["rope_scaling"] = {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_context_length,
        }
    return out


def check_sliding_window(hf: HFConfig, window: int | None, layers_sliding: bool = True) -> None:
    """Sliding-window attention changes results only past the window: refuse it if it can happen."""
    context = hf["max_position_embeddings"]
    if window is not None and layers_sliding and window < context:
        raise hf.unsupported(
            f"sliding-window attention (sliding_window={window} < max_position_embeddings={context})",
            "full attention; to use this model within its window, set max_position_embeddings to "
            f"{window} in config.json",
        )
