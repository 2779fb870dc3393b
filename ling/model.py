"""The ling transformer, top to bottom: embeddings → blocks (attention, MLP) → norm → head.

One module covers GPT-2, Llama, Mistral and Qwen style models; `ModelConfig` picks the
parts. Read it in order:

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

import functools
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

    Attention over the cache runs in the cache's dtype, which may differ from the model's:
    on CPU an fp32 cache is the fast choice even for bf16 weights, because PyTorch's CPU
    attention kernel is several times slower in bf16 for a single query per row.
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
        self.k[layer][rows, :, positions] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, positions] = v.transpose(1, 2).to(self.v[layer].dtype)
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


def _compiled_cpu_training(x: torch.Tensor) -> bool:
    """Whether `x` is being traced into a compiled CPU graph that will run a backward pass:
    where `Linear` and `embedding` swap inductor's code for ATen's kernels."""
    return torch.compiler.is_compiling() and torch.is_grad_enabled() and x.device.type == "cpu"


class Linear(nn.Linear):
    """`nn.Linear`, except in a compiled CPU training step: there the product is a plain
    matmul whose bias the next fused kernel adds, and the bias's gradient is ATen's column
    sum (`ling::bias_grad`). ATen's CPU `addmm` first copies the broadcast bias into its
    output (a pass over it), and inductor fused the bias gradient's reduction into kernels
    it made ~2× slower: this form makes a 6 × 384 GPT-2's compiled bf16 step 2–3% faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None and _compiled_cpu_training(x):
            y = F.linear(x, self.weight)
            return _AddBias.apply(y, self.bias.to(y.dtype))
        return super().forward(x)


class _AddBias(torch.autograd.Function):
    @staticmethod
    def forward(y, bias):
        return y + bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, _bias_grad(grad.flatten(0, -2)) if ctx.needs_input_grad[1] else None


@torch.library.custom_op("ling::bias_grad", mutates_args=())
def _bias_grad(grad: torch.Tensor) -> torch.Tensor:
    """An op of its own, so that inductor calls ATen's sum instead of fusing the reduction."""
    return grad.sum(0)


@_bias_grad.register_fake
def _(grad):
    return grad.new_empty(grad.shape[-1])


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, through `scaled_dot_product_attention`.

    q, k and v come from one fused projection `qkv` (one matmul instead of three), laid out
    as [q heads | k heads | v heads]; `o` projects back to the model width.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.q_size = cfg.n_head * cfg.head_dim
        self.kv_size = cfg.n_kv_head * cfg.head_dim
        self.qkv = Linear(cfg.n_embd, self.q_size + 2 * self.kv_size, bias=cfg.bias in ("qkv", "all"))
        self.o = Linear(self.q_size, cfg.n_embd, bias=cfg.bias == "all")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, rope, positions, mask, cache: KVCache | None, layer: int):
        cfg = self.cfg
        B, T, _ = x.shape
        H, H_kv = cfg.n_head, cfg.n_kv_head
        qkv = self.qkv(x).unflatten(-1, (H + 2 * H_kv, cfg.head_dim))  # (B, T, heads, D)
        qk, v = qkv.split([H + H_kv, H_kv], dim=2)  # a split, not two slices: its gradient is one cat
        attention_dtype = qkv.dtype if cache is None else cache.dtype  # the cache's precision (see KVCache)
        if cfg.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        if rope is not None:  # q and k heads rotated together: one set of ops, not two
            qk = apply_rope(qk, *rope, dtype=attention_dtype)
        q, k = qk.to(attention_dtype).transpose(1, 2).split([H, H_kv], dim=1)
        v = v.transpose(1, 2)
        dropout = cfg.dropout if self.training else 0.0
        if cache is not None:
            k, v = cache.write(layer, k, v, positions)
        if cache is None and q.device.type == "cpu" and q.dtype == torch.bfloat16:
            y = explicit_attention(q, k, v, mask, dropout)
        elif (cache is not None and T == 1 and q.device.type == "cpu" and mask.dtype == torch.bool
              and torch.compiler.is_compiling()):  # a compiled decode step (with a cache, a mask is set)
            y = single_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None,
                enable_gqa=H_kv != H,
            )
        return self.o(y.transpose(1, 2).reshape(B, T, self.q_size).to(qkv.dtype))


def explicit_attention(q, k, v, mask=None, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v as two batched matmuls, the scale and the mask fused into
    the first (`baddbmm`). What SDPA computes; on CPU in bf16 this is ~2.5× faster than
    SDPA's fused CPU kernels for a training step (they upcast to fp32 internally), so the
    model takes this path there (outside of KV-cache decoding).

    With the plain causal mask, the first half of the queries only looks at the first half
    of the keys: computing the halves apart skips the masked quarter of the work.
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    if k.shape[1] != H:  # grouped key/value heads
        k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    k, v = k.reshape(B * H, S, D), v.reshape(B * H, S, D)
    if mask is None and T == S and T % 2 == 0:
        # Every operand its own dense tensor: a batched matmul copies an operand whose batches
        # are not packed back to back (a slice of the sequence), forward and backward.
        h = T // 2
        q_top, q_bottom = q.unflatten(2, (2, h)).permute(2, 0, 1, 3, 4).reshape(2, B * H, h, D)
        if torch.compiler.is_compiling():  # inductor fuses the slices' gradients into one kernel
            k_top, v_top = k[:, :h].contiguous(), v[:, :h].contiguous()
        else:
            k, k_top = _WithFirstRows.apply(k, h)
            v, v_top = _WithFirstRows.apply(v, h)
        top = _attend(q_top, k_top, v_top, None, dropout)
        bottom = _attend(q_bottom, k, v, None, dropout)
        halves = torch.stack([top, bottom])  # (2, B·H, h, D): its gradient's halves are dense too
        # to (B, T, H, D) memory, returned as the (B, H, T, D) view that SDPA's caller transposes back
        return halves.view(2, B, H, h, D).permute(1, 0, 3, 2, 4).reshape(B, T, H, D).transpose(1, 2)
    q = q.reshape(B * H, T, D)
    if mask is not None:
        mask = mask.view(T, S) if mask.shape[0] == 1 else mask.expand(B, H, T, S).reshape(B * H, T, S)
    return _attend(q, k, v, mask, dropout).view(B, H, T, D)


class _WithFirstRows(torch.autograd.Function):
    """(x, x[:, :n] as a dense copy) for x (N, S, D). The gradient is one pass over x's —
    the copy's added into its first rows — where a slice's backward fills a tensor of x's
    size with zeros, copies into it and adds it to x's gradient (~1.5% of an eager step)."""

    @staticmethod
    def forward(x, n):
        return x.view_as(x), x[:, :n].contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.n = inputs[1]

    @staticmethod
    def backward(ctx, grad, grad_first):
        n = ctx.n
        return torch.cat([grad[:, :n] + grad_first, grad[:, n:]], dim=1), None


def single_query_attention(q, k, v, mask) -> torch.Tensor:
    """Attention of one query per row, q (B, H, 1, D), over k, v (B, H_kv, S, D) with a
    boolean mask (B, 1, 1, S): what SDPA computes, written as matmuls and a softmax for a
    compiled decode step on CPU. Inductor fuses the scale, mask and softmax around them,
    where SDPA's CPU kernel costs ~20 µs a call, ~15% of a small model's step.

    The query heads that share a key/value head (adjacent, as in `enable_gqa`) are that
    head's rows, so grouped heads need no copy of the cache."""
    B, H, _, D = q.shape
    H_kv = k.shape[1]
    q = q.view(B, H_kv, H // H_kv, D)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs @ v).view(B, H, 1, D)


def _attend(q, k, v, mask, dropout: float) -> torch.Tensor:
    """Attention of q (N, T, D) over k, v (N, S, D); mask (T, S) or (N, T, S), None = causal
    with the queries at the last T of the S positions."""
    T, S = q.shape[1], k.shape[1]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    bias = bias.expand(q.shape[0], T, S)  # a (T, S) bias broadcasts without a copy
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
    probs = scores.softmax(dim=-1)
    return torch.bmm(F.dropout(probs, dropout) if dropout > 0 else probs, v)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximated GELU.

    When training on CPU, ATen's `tanh` is the slow part of it (a GELU forward and backward
    took ~10% of a 6 × 384 model's bf16 step). The same function written with a sigmoid —
    0.5·(1 + tanh z) = sigmoid(2z) — and compiled by inductor into one fused loop for the
    forward and one for the backward runs ~2× faster (computed in fp32, rounded once).
    Without gradients (inference) ATen's kernel stays: the tensors are small there and a
    compiled call costs more than it saves."""
    if torch.compiler.is_compiling():  # inside a compiled model, inductor fuses it anyway
        return _gelu_tanh_as_sigmoid(x)
    if x.requires_grad and x.device.type == "cpu":
        return _compiled_gelu()(x)
    return F.gelu(x, approximate="tanh")


_GELU_K = math.sqrt(8 / math.pi)  # 2·√(2/π): sigmoid(2z) with z = √(2/π)·(x + 0.044715·x³)


def _gelu_tanh_as_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x * (_GELU_K + _GELU_K * 0.044715 * x * x))


@functools.cache
def _compiled_gelu():
    """Compiled on first use: importing torch's compiler takes ~1.5 s, which commands that
    never train should not pay."""
    return torch.compile(_gelu_tanh_as_sigmoid, dynamic=True)


def embedding(table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """`table(ids)`, except in a compiled CPU training step: there the table's gradient stays
    ATen's kernel (inductor's scatter-add of it, contended on a small vocabulary, took ~12 ms
    of a 6 × 384 model's ~420 ms step where ATen's takes ~1 ms)."""
    if table.weight.requires_grad and _compiled_cpu_training(ids):
        return _EmbeddingWithATenGrad.apply(ids, table.weight)
    return table(ids)


class _EmbeddingWithATenGrad(torch.autograd.Function):
    @staticmethod
    def forward(ids, weight):
        return F.embedding(ids, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ids, weight = inputs
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        return None, _embedding_weight_grad(grad, ids, ctx.num_weights)


@torch.library.custom_op("ling::embedding_weight_grad", mutates_args=())
def _embedding_weight_grad(grad: torch.Tensor, ids: torch.Tensor, num_weights: int) -> torch.Tensor:
    """An op of its own, so that inductor calls it instead of decomposing it."""
    return torch.ops.aten.embedding_dense_backward(grad, ids, num_weights, -1, False)


@_embedding_weight_grad.register_fake
def _(grad, ids, num_weights):
    return grad.new_empty(num_weights, grad.shape[-1])


class MLP(nn.Module):
    """GPT-2 MLP (up → GELU-tanh → down) or Llama SwiGLU (silu(gate) * up → down)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.bias == "all"
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate = Linear(cfg.n_embd, cfg.mlp_hidden, bias=bias)
        self.up = Linear(cfg.n_embd, cfg.mlp_hidden, bias=bias)
        self.down = Linear(cfg.mlp_hidden, cfg.n_embd, bias=bias)

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(gelu_tanh(self.up(x)))


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
        x = embedding(self.embed, tokens)
        rope = None
        if self.cfg.position == "learned":
            x = x + embedding(self.pos_embed, positions)
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
