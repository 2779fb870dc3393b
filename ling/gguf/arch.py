"""ling's model families as GGUF architectures: tensor names, the Q/K row order, metadata.

GGUF names tensors the llama.cpp way (`blk.3.attn_q.weight`) and describes the model with
`{arch}.*` keys. Neither is listed here by hand: the family module in `ling.hf` maps each
ling parameter to its Hugging Face tensor(s) and config keys, and gguf-py's own
`TensorNameMap` maps the HF tensor names to llama.cpp's — the tables llama.cpp's
`convert_hf_to_gguf.py` uses. What is left is one small key table per architecture.

Llama and Mistral (both GGUF `llama`) rotate q and k in interleaved pairs where HF and
ling rotate halves, so llama.cpp's converter reorders the rows of q and k inside each head
(`permute_rows`), and readers undo it (`unpermute_rows`). Qwen keeps the halves (NEOX
RoPE in llama.cpp) and GPT-2 has no RoPE: no reordering.

Llama-3 RoPE scaling travels as the `rope_freqs.weight` tensor (one divisor per frequency),
which is what llama.cpp reads; `rope_scaling_from_factors` recovers the four parameters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ling.config import ModelConfig, RopeScaling
from ling.errors import LingError
from ling.gguf.library import require_gguf
from ling.hf import FAMILIES
from ling.hf.family import Family
from ling.model import rope_inv_freq
from ling.weights import Source, WeightMap

ROPE_FREQS = "rope_freqs.weight"

LLAMA_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.value_length": "head_dim",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
"""GGUF key (after `{arch}.`) → HF config key, for the Llama-shaped architectures."""

GPT2_KEYS = {
    "context_length": "n_positions",
    "embedding_length": "n_embd",
    "block_count": "n_layer",
    "feed_forward_length": "n_inner",
    "attention.head_count": "n_head",
    "attention.layer_norm_epsilon": "layer_norm_epsilon",
    "vocab_size": "vocab_size",
}


@dataclass(frozen=True)
class Arch:
    """One GGUF architecture and the HF family ling reads and writes it as."""

    name: str
    """`general.architecture` (llama.cpp's name)"""
    keys: dict[str, str]
    permute_qk: bool
    """q/k rows stored in llama.cpp's interleaved RoPE order"""


ARCHS = {
    "LlamaForCausalLM": Arch("llama", LLAMA_KEYS, permute_qk=True),
    "MistralForCausalLM": Arch("llama", LLAMA_KEYS, permute_qk=True),
    "Qwen2ForCausalLM": Arch("qwen2", LLAMA_KEYS, permute_qk=False),
    "Qwen3ForCausalLM": Arch("qwen3", LLAMA_KEYS, permute_qk=False),
    "GPT2LMHeadModel": Arch("gpt2", GPT2_KEYS, permute_qk=False),
}
"""HF architecture → GGUF architecture, for every family ling exports."""

SUPPORTED = ", ".join(sorted({a.name for a in ARCHS.values()}))


def family_named(architecture: str) -> Family:
    return next(f for f in FAMILIES if f.architecture == architecture)


def family_for_gguf(arch_name: str, where: str) -> Family:
    """The family a GGUF architecture is read as (`llama` is Llama: Mistral without a sliding
    window, the only Mistral ling has, is the same model)."""
    for architecture, arch in ARCHS.items():
        if arch.name == arch_name:
            return family_named(architecture)
    raise LingError(f"{where}: GGUF architecture '{arch_name}' is not supported (ling reads {SUPPORTED})")


def model_name(cfg: ModelConfig) -> str | None:
    """`general.name`: the config's name, unless that is just a family's (an HF import has no
    name of its own — and transformers' GGUF loader fails on a `llama` file named 'mistral')."""
    return None if cfg.name in {f.model_type for f in FAMILIES} else cfg.name


# ---- tensors ------------------------------------------------------------------------------
def gguf_weight_map(family: Family, cfg: ModelConfig) -> WeightMap:
    """ling parameter → the GGUF tensors it is made of (q, k, v apart for Llama and Qwen).

    `cfg` is the config as the family stores it (`family.as_stored`). GGUF keeps every
    matrix in PyTorch's (out, in) layout — llama.cpp transposes GPT-2's Conv1D weights on
    conversion — so nothing here is transposed.
    """
    gguf = require_gguf()
    arch = ARCHS[family.architecture]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], cfg.n_layer)
    result: WeightMap = {}
    for param, sources in family.weight_map(cfg).items():
        renamed = []
        for source in sources:
            gguf_name = names.get_name(source.name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise LingError(f"gguf-py has no llama.cpp name for '{source.name}' of {arch.name}")
            renamed.append(Source(gguf_name, source.rows))
        result[param] = tuple(renamed)
    return result


def permuted_heads(family: Family, cfg: ModelConfig) -> dict[str, int]:
    """GGUF tensor → number of heads, for the q/k tensors stored in interleaved RoPE order."""
    if not ARCHS[family.architecture].permute_qk:
        return {}
    heads = {}
    for i in range(cfg.n_layer):
        for suffix in ("weight", "bias"):
            heads[f"blk.{i}.attn_q.{suffix}"] = cfg.n_head
            heads[f"blk.{i}.attn_k.{suffix}"] = cfg.n_kv_head
    return heads


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split RoPE rows → llama.cpp's interleaved pairs, per head (`LlamaModel.permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rows`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- RoPE scaling -------------------------------------------------------------------------
def rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """What llama.cpp divides each RoPE frequency by (`rope_freqs.weight`): 1 without scaling."""
    unscaled = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    return unscaled / rope_inv_freq(cfg)


def rope_scaling_from_factors(factors: np.ndarray, cfg: ModelConfig, where: str) -> RopeScaling | None:
    """The Llama-3 scaling whose frequency divisors are `factors` (None if they are all 1).

    The divisors are 1 below a wavelength, `factor` above another, and 1 / ((1-s)/factor + s)
    between, with s linear in 1/wavelength. Any (low, high, original context) giving the same
    line gives the same model, so low_freq_factor is taken as 1 (as in Llama 3.x) and the
    rest solved for; the result is checked by recomputing the divisors.
    """
    factors = np.asarray(factors, dtype=np.float64)
    base = dataclasses.replace(cfg, rope_scaling=None)
    wavelen = (2 * math.pi / rope_inv_freq(base)).double().numpy()
    if len(factors) != len(wavelen):
        raise LingError(f"{where}: {ROPE_FREQS} has {len(factors)} values, the model has {len(wavelen)} RoPE frequencies")
    factor = float(factors.max())
    if np.allclose(factors, 1.0, rtol=1e-6):
        return None
    tol = 1e-4 * factor
    ones, full = np.abs(factors - 1) < tol, np.abs(factors - factor) < tol
    between = ~ones & ~full
    s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    if between.sum() >= 2:  # s = a / wavelen - b, fitted
        a, minus_b = np.polyfit(1 / wavelen[between], s, 1)
        b = -minus_b
        high, original = 1 + 1 / b, a / b
    else:  # boundaries anywhere between the neighbouring wavelengths keep the same divisors
        last_one = wavelen[ones].max() if ones.any() else wavelen.min() / 2
        first_full = wavelen[full].min() if full.any() else wavelen.max() * 2
        if between.any():
            w, s1 = float(wavelen[between][0]), float(s[0])
            original = round(math.sqrt(w * first_full))
            high = 1 + (original / w - 1) / s1
        else:
            original = round(math.sqrt(last_one * first_full))
            high = original / math.sqrt(last_one * original)
    # stored in float32: keep the decimals they were written with
    scaling = RopeScaling(factor=float(f"{factor:.6g}"), low_freq_factor=1.0, high_freq_factor=float(f"{high:.6g}"),
                          original_context_length=int(round(original)))
    recomputed = rope_factors(dataclasses.replace(cfg, rope_scaling=scaling)).double().numpy()
    if not np.allclose(recomputed, factors, rtol=1e-4):
        raise LingError(f"{where}: {ROPE_FREQS} holds RoPE frequency factors that are not Llama-3 scaling "
                        "(ling supports no RoPE scaling, or rope_type 'llama3')")
    return scaling


# ---- metadata -----------------------------------------------------------------------------
def arch_metadata(family: Family, cfg: ModelConfig) -> dict[str, int | float]:
    """The `{arch}.*` keys of a model: its HF config keys, renamed."""
    arch = ARCHS[family.architecture]
    hf = family.config_to_hf(cfg)
    return {f"{arch.name}.{key}": hf[hf_key] for key, hf_key in arch.keys.items()}


def config_from_metadata(family: Family, metadata: dict, tensor_shapes: dict[str, tuple[int, ...]],
                         rope_freqs: np.ndarray | None, where: str) -> ModelConfig:
    """The ModelConfig of a GGUF file: its keys as an HF config.json, read by the family module
    (which checks what ling supports), plus what the file says through its tensors — the
    vocabulary (embedding rows), a tied head (no `output.weight`), biases, RoPE scaling."""
    arch = ARCHS[family.architecture]
    hf = {hf_key: metadata[f"{arch.name}.{key}"] for key, hf_key in arch.keys.items()
          if f"{arch.name}.{key}" in metadata}
    if "token_embd.weight" not in tensor_shapes:
        raise LingError(f"{where}: no token_embd.weight tensor — not a language model GGUF")
    hf["vocab_size"] = tensor_shapes["token_embd.weight"][0]
    hf["tie_word_embeddings"] = "output.weight" not in tensor_shapes
    if arch.name == "llama":
        hf.update(attention_bias="blk.0.attn_q.bias" in tensor_shapes, mlp_bias="blk.0.ffn_up.bias" in tensor_shapes,
                  sliding_window=None)
    scaling_type = metadata.get(f"{arch.name}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        hf["rope_scaling"] = {"rope_type": scaling_type}
    cfg = family.config_from_hf(hf, where)
    if rope_freqs is not None:
        cfg = dataclasses.replace(cfg, rope_scaling=rope_scaling_from_factors(rope_freqs, cfg, where))
    return dataclasses.replace(cfg, name=metadata.get("general.name") or cfg.name)
