"""`ModelConfig`: every architectural choice of a ling transformer, plus named presets.

One dataclass covers GPT-2, Llama 1/2/3, Mistral, Qwen2 and Qwen3 style models: the
differences between those families are a handful of switches (norm, MLP, positions,
biases, QK-norm, GQA, tying). `config.json` in a checkpoint is this dataclass as JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import tyro

from ling.dataclass_io import closest, from_dict, to_dict
from ling.errors import LingError, read_json

MAX_CONTEXT_LENGTH = 1 << 24
"""the longest context a config may ask for (16M positions; the longest open models have ~1M)"""


@dataclass
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (HF `rope_scaling` with `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192

    def __post_init__(self):
        if not (math.isfinite(self.factor) and self.factor > 0 and math.isfinite(self.high_freq_factor)
                and 0 < self.low_freq_factor < self.high_freq_factor and self.original_context_length > 0):
            raise LingError(f"model.rope_scaling: factor and original_context_length must be positive and "
                            f"0 < low_freq_factor < high_freq_factor, got {self}")


@dataclass
class ModelConfig:
    """Shape and switches of a decoder-only transformer."""

    name: str = "custom"
    """preset this config came from (informational)"""
    vocab_size: Annotated[int, tyro.conf.arg(help_behavior_hint="(default: from the dataset's tokenizer)")] = 256
    """tokens in the vocabulary"""
    context_length: int = 256
    """maximum sequence length (positions) the model supports"""
    n_layer: int = 4
    n_embd: int = 128
    """model width"""
    n_head: int = 4
    n_kv_head: Optional[int] = None
    """key/value heads: None = n_head (MHA); fewer = GQA; 1 = MQA"""
    head_dim: Optional[int] = None
    """None = n_embd // n_head"""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """'gelu' = GPT-2 MLP (tanh-approximated GELU); 'swiglu' = Llama gated MLP"""
    mlp_hidden: Optional[int] = None
    """None = 4 * n_embd"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_bias: bool = True
    """LayerNorm has a bias (ignored for RMSNorm)"""
    norm_eps: float = 1e-5
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    """Llama-3 RoPE frequency scaling: None, or a mapping such as '{factor: 8,
    low_freq_factor: 1, high_freq_factor: 4, original_context_length: 8192}'"""
    bias: Literal["none", "qkv", "all"] = "none"
    """linear-layer biases: none (Llama), qkv only (Qwen2), everywhere (GPT-2)"""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before RoPE (Qwen3)"""
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise LingError(
                    f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim explicitly"
                )
            self.head_dim = self.n_embd // self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd
        if self.n_head % self.n_kv_head:
            raise LingError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise LingError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for key in ("vocab_size", "context_length", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "mlp_hidden"):
            if getattr(self, key) <= 0:
                raise LingError(f"model.{key} must be positive, got {getattr(self, key)}")
        self._check_values()

    def _check_values(self) -> None:
        """Ranges outside which a model trains to NaN or cannot be built: refused up front."""
        if not 0 <= self.dropout < 1:
            raise LingError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise LingError(f"model.norm_eps must be a small positive number (1e-5 is usual), got {self.norm_eps}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta >= 1):
            raise LingError(f"model.rope_theta must be at least 1 (the RoPE base; 10000 is usual), "
                            f"got {self.rope_theta}")
        if not (math.isfinite(self.init_std) and self.init_std >= 0):
            raise LingError(f"model.init_std must be a finite number >= 0 (0.02 is usual), got {self.init_std}")
        if self.context_length > MAX_CONTEXT_LENGTH:
            per_position = 2 * self.head_dim if self.position == "rope" else self.n_embd  # cos + sin, or a table row
            raise LingError(
                f"model.context_length {self.context_length:,} is more than ling supports ({MAX_CONTEXT_LENGTH:,}): "
                f"its position tables alone would allocate {_size(self.context_length * per_position * 4)}")

    # ---- sizes -------------------------------------------------------------------------
    def num_params(self) -> int:
        """Closed-form parameter count (tests check it against the built model)."""
        d, hd, L = self.n_embd, self.head_dim, self.n_layer
        q_out, kv_out = self.n_head * hd, self.n_kv_head * hd
        norm = d * (2 if self.norm == "layernorm" and self.norm_bias else 1)
        attn = d * (q_out + 2 * kv_out) + q_out * d
        if self.bias in ("qkv", "all"):
            attn += q_out + 2 * kv_out
        if self.bias == "all":
            attn += d
        if self.qk_norm:
            attn += 2 * hd
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * d * self.mlp_hidden
        if self.bias == "all":
            mlp += (n_mats - 1) * self.mlp_hidden + d
        block = 2 * norm + attn + mlp
        embed = self.vocab_size * d
        pos = self.context_length * d if self.position == "learned" else 0
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return embed + pos + L * block + norm + head

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B convention.

        6 × (parameters that take part in a matmul, the LM head included) plus the
        attention score/value matmuls, 12 × layers × heads × head_dim × seq_len.
        """
        T = seq_len or self.context_length
        d, hd = self.n_embd, self.head_dim
        q_out, kv_out = self.n_head * hd, self.n_kv_head * hd
        n_mats = 3 if self.mlp == "swiglu" else 2
        per_layer = d * (q_out + 2 * kv_out) + q_out * d + n_mats * d * self.mlp_hidden
        matmul_params = self.n_layer * per_layer + self.vocab_size * d
        return 6 * matmul_params + 12 * self.n_layer * self.n_head * hd * T

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> "ModelConfig":
        return from_dict(cls, data, where=where)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json(path), where=str(path))

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset, optionally with some fields replaced (derived fields such as
        head_dim follow a new n_embd / n_head unless they are overridden too)."""
        if name not in PRESETS:
            hint = closest(name, list(PRESETS))
            extra = f"; did you mean '{hint}'?" if hint else ""
            raise LingError(f"unknown model preset '{name}'{extra} (presets: {', '.join(PRESETS)})")
        return dataclasses.replace(unresolved(PRESETS[name]), **overrides)


def _size(nbytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:,.1f} {unit}"
        nbytes /= 1000


def unresolved(cfg: ModelConfig) -> ModelConfig:
    """A copy of `cfg` with n_kv_head, head_dim and mlp_hidden set back to None where they
    hold the value derived from n_head / n_embd, so that a config built from it (with
    `dataclasses.replace`, or by the CLI from flags) derives them again from the new values.
    A template for defaults, not a config to use: it skips validation."""
    template = copy.copy(cfg)
    if cfg.n_kv_head == cfg.n_head:
        template.n_kv_head = None
    if cfg.head_dim is not None and cfg.head_dim * cfg.n_head == cfg.n_embd:
        template.head_dim = None
    if cfg.mlp_hidden == 4 * cfg.n_embd:
        template.mlp_hidden = None
    return template


PRESETS: dict[str, ModelConfig] = {
    # Small enough for unit tests; exercises GQA, RoPE, SwiGLU and RMSNorm.
    "tiny": ModelConfig(
        name="tiny", vocab_size=128, context_length=64, n_layer=2, n_embd=32, n_head=4,
        n_kv_head=2, mlp="swiglu", mlp_hidden=64, norm="rmsnorm", position="rope",
    ),
    # nanoGPT's shakespeare-char model (vocab: 65 characters + ling's special tokens).
    "shakespeare-char": ModelConfig(
        name="shakespeare-char", vocab_size=72, context_length=256, n_layer=6, n_embd=384,
        n_head=6, norm_bias=False, dropout=0.2,
    ),
    # GPT-2 small (124M), laid out exactly as HF GPT2LMHeadModel.
    "gpt2": ModelConfig(
        name="gpt2", vocab_size=50257, context_length=1024, n_layer=12, n_embd=768, n_head=12,
        bias="all",
    ),
    # A Llama-style 110M model: GQA (12 query / 4 kv heads), SwiGLU, RMSNorm, RoPE.
    "llama-110m": ModelConfig(
        name="llama-110m", vocab_size=32000, context_length=1024, n_layer=12, n_embd=768,
        n_head=12, n_kv_head=4, mlp="swiglu", mlp_hidden=2432, norm="rmsnorm",
        position="rope", tie_embeddings=True,
    ),
}
