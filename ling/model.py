"""The ling transformer, top to bottom: embeddings → blocks (attention, MLP) → norm → head.

One module covers GPT-2, Llama, Mistral and Qwen style models; `ModelConfig` picks the
parts. This is the plain reference model: `nn.Linear`, `nn.Embedding`, the GELU and
SwiGLU formulas, RoPE, a KV cache and one attention call. Faster implementations of some
of these parts live in `ling/kernels/` and are swapped in from outside (by the trainer and
the inference engine) after a measurement says they pay; each is tested against this file.

Read it in order:

1. `KVCache`  – preallocated key/value buffers for incremental decoding.
2. `rope_*`   – rotary position tables (with Llama-3 frequency scaling) and their use.
3. `Attention`, `MLP`, `Block` – one transformer layer.
4. `Transformer` – the whole model, its `forward`, initialisation and size helpers.
5. `build_model` – construction on the meta device, then materialisation.

Positions and masks. `forward(tokens, positions=None, mask=None, cache=None)`:
- `positions` (B, T) are each token's position (RoPE angle / learned-embedding row) and,
  with a cache, also the cache slot it is written to. Default: 0..T-1.
- `mask` (B or 1, 1, T, S) bool, True = may attend. Default: causal over `positions`
  (a query at position p sees keys in slots ≤ p), which is exactly right for training,
  for prefill and for decoding rows of different lengths in one batch. Packed sequences
  pass a block-causal mask (see `block_causal_mask`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ling.config import ModelConfig


# ---------------------------------------------------------------------------------------
# 1. KV cache
# ---------------------------------------------------------------------------------------
class KVCache:
    """Static per-layer key/value buffers of shape (batch, n_kv_head, max_len, head_dim).

    Each row of the batch writes at its own positions, so sequences of different lengths
    (and, in a server, requests that joined at different times) share one cache. The
    buffers never change shape, which keeps decoding friendly to `torch.compile`.
    Attention over the cache runs in the cache's dtype, which may differ from the model's.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.batch_size, self.max_len, self.dtype = batch_size, max_len, dtype
        self.kv_len = max_len
        """how many leading slots attention reads; a caller may shrink it to skip empty slots"""
        self._rows = torch.arange(batch_size, device=device)[:, None]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows start:stop of this one, sharing its buffers: lets a request be
        prefilled into its own rows while the other rows keep their contents."""
        view = object.__new__(KVCache)
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.batch_size, view.max_len, view.kv_len, view.dtype = stop - start, self.max_len, self.kv_len, self.dtype
        view._rows = self._rows[: stop - start]
        return view

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store k, v (B, H_kv, T, D) at slots `positions` (B, T); return the readable span."""
        rows = self._rows[: k.shape[0]]
        # Advanced indices around a slice put the indexed dims first: (B, T, H_kv, D).
        self.k[layer][rows, :, positions] = k.transpose(1, 2).to(self.dtype)
        self.v[layer][rows, :, positions] = v.transpose(1, 2).to(self.dtype)
        n = self.kv_len
        return self.k[layer][: k.shape[0], :, :n], self.v[layer][: k.shape[0], :, :n]


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) mask for packed sequences: causal, and no attention across documents."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


# ---------------------------------------------------------------------------------------
# 2. Rotary position embeddings
# ---------------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE, with Llama-3 scaling of the long wavelengths."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_context_length / s.low_freq_factor
    high_wavelen = s.original_context_length / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_context_length / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (context_length, head_dim), in the rotate-half layout of HF Llama."""
    inv_freq = rope_inv_freq(cfg)  # float32, as transformers computes it
    t = torch.arange(cfg.context_length, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin (B, T, 1, D) in float32; the result in `dtype` (x's by default)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(dtype or x.dtype)


# ---------------------------------------------------------------------------------------
# 3. One transformer layer
# ---------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Llama/Qwen do (weight applied after the cast back)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.n_embd
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads.

    q, k and v come from one fused projection `qkv` (one matmul instead of three), laid out
    as [q heads | k heads | v heads]; `o` projects back to the model width.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.q_size = cfg.n_head * cfg.head_dim
        self.kv_size = cfg.n_kv_head * cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, self.q_size + 2 * self.kv_size, bias=cfg.bias in ("qkv", "all"))
        self.o = nn.Linear(self.q_size, cfg.n_embd, bias=cfg.bias == "all")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, rope, positions, mask, cache: KVCache | None, layer: int):
        cfg = self.cfg
        B, T, _ = x.shape
        H, H_kv = cfg.n_head, cfg.n_kv_head
        qkv = self.qkv(x).unflatten(-1, (H + 2 * H_kv, cfg.head_dim))  # (B, T, heads, D)
        qk, v = qkv.split([H + H_kv, H_kv], dim=2)  # a split, not two slices: its gradient is one cat
        attention_dtype = qkv.dtype if cache is None else cache.dtype
        if cfg.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        if rope is not None:  # q and k heads rotated together: one set of ops, not two
            qk = apply_rope(qk, *rope, dtype=attention_dtype)
        q, k = qk.to(attention_dtype).transpose(1, 2).split([H, H_kv], dim=1)  # (B, heads, T, D)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, k, v, positions)
        y = self.attend(q, k, v, mask, cfg.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, self.q_size).to(qkv.dtype))

    def attend(self, q, k, v, mask, dropout: float) -> torch.Tensor:
        """softmax(q kᵀ / √d + mask) v for q (B, H, T, D) and k, v (B, H_kv, S, D); without a
        mask, causal. The one place attention is computed (a kernel may override it)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                              enable_gqa=self.cfg.n_kv_head != self.cfg.n_head)


class MLP(nn.Module):
    """GPT-2 MLP (up → GELU-tanh → down) or Llama SwiGLU (silu(gate) * up → down)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.bias == "all"
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=bias)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=bias)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=bias)

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, positions, mask, cache, layer):
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, positions, mask, cache, layer))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


# ---------------------------------------------------------------------------------------
# 4. The model
# ---------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """A decoder-only language model. Parameter names are plain (`embed.weight`,
    `blocks.0.attn.qkv.weight`, …) and are what `model.safetensors` stores."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.position == "learned":
            self.pos_embed = nn.Embedding(cfg.context_length, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg, device=self.embed.weight.device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        """recompute each block in the backward pass instead of storing its activations"""

    # ---- forward ------------------------------------------------------------------------
    def hidden_states(self, tokens, positions=None, mask=None, cache: KVCache | None = None):
        """Final-norm hidden states (B, T, n_embd): the input of any head (LM or task)."""
        B, T = tokens.shape
        if positions is None:
            if cache is not None:
                raise ValueError("decoding with a KV cache needs explicit positions")
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed(tokens)
        rope = None
        if self.cfg.position == "learned":
            x = x + self.pos_embed(positions)
        else:
            rope = (self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None])
        if cache is not None and mask is None:
            # Causal over cache slots: the key in slot j is visible to a query at position p iff j <= p.
            slots = torch.arange(cache.kv_len, device=tokens.device)
            mask = (slots[None, None, :] <= positions[:, :, None])[:, None]
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, positions, mask, cache, i, use_reentrant=False)
            else:
                x = block(x, rope, positions, mask, cache, i)
        return self.final_norm(x)

    def forward(self, tokens, positions=None, mask=None, cache: KVCache | None = None):
        """Logits (B, T, vocab_size) for every position."""
        return self.lm_head(self.hidden_states(tokens, positions, mask, cache))

    # ---- initialisation -----------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self):
        """GPT-2 initialisation: N(0, init_std), residual projections scaled by 1/√(2·layers)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("attn.o", "mlp.down")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self):
        """(Re)compute non-parameter state, e.g. after building on the meta device."""
        if self.cfg.position == "rope":
            device = self.embed.weight.device
            cos, sin = rope_tables(self.cfg, device=device)
            self.rope_cos, self.rope_sin = cos, sin

    # ---- sizes --------------------------------------------------------------------------
    def set_dropout(self, p: float) -> None:
        """Change the dropout of a built model: fine-tuning on a few thousand examples often
        wants less (or none) than pretraining did. The config is shared by every layer."""
        self.cfg.dropout = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p

    def num_params(self) -> int:
        """Parameters actually held (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        return self.cfg.flops_per_token(seq_len)


# ---------------------------------------------------------------------------------------
# 5. Construction
# ---------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, device="cpu", dtype: torch.dtype | None = None, init: bool = True) -> Transformer:
    """Build on the meta device (no memory, no time), then materialise on `device`.

    With `init=False` the weights are left uninitialised for a checkpoint to fill; the
    non-parameter buffers are always computed.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty re-creates parameters; tie again
        model.lm_head.weight = model.embed.weight
    if init:
        model.init_weights()
    else:
        model.init_buffers()
    if dtype is not None:
        model.to(dtype)
    return model


def autocast_context(device_type: str, precision: str):
    """bf16/fp16 autocast for `precision`, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)
