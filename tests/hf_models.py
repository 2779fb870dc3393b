"""Tiny random Hugging Face models of every supported family and option, for parity tests.

Every parameter is re-drawn at random (norm weights around 1, biases non-zero), so a
mapping mistake anywhere — a swapped k/v, a forgotten bias or norm — changes the logits.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

VOCAB = 97
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                               eos_token_id=2),
    "gpt2-untied": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=40,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama2-untied": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "llama3-rope-scaling-tied": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True,
                                                    rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "llama-explicit-head-dim": lambda: LlamaConfig(**_COMMON, num_key_value_heads=1, head_dim=16),
    "llama-attention-and-mlp-bias": lambda: LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True),
    "mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=2, head_dim=12, sliding_window=64),
    "qwen2-qkv-bias-tied": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3-qk-norm": lambda: Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "qwen3-tied": lambda: Qwen3Config(**_COMMON, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator) * 0.3
        is_norm = "norm" in name or ".ln_" in name
        p.copy_(noise + (1.0 if is_norm and name.endswith("weight") else 0.0))
    return model


def hf_model(variant: str, seed: int = 0):
    """A random transformers model of `variant`, in eval mode (fp32)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(VARIANTS[variant]())
    return randomize(model, seed).eval()


def save_hf_model(variant: str, directory, seed: int = 0, **save_kwargs):
    model = hf_model(variant, seed)
    model.save_pretrained(directory, **save_kwargs)
    return model


def padded_batch(lengths: list[int], vocab: int = VOCAB, seed: int = 0):
    """Token ids (B, T), right-padded, and the validity mask (B, T) of a batch of varied lengths."""
    generator = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.randint(3, vocab, (len(lengths), T), generator=generator)
    valid = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return tokens.masked_fill(~valid, 0), valid


def ling_logits(model, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """ling's logits for a right-padded batch: causal attention over each row's real tokens."""
    B, T = tokens.shape
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    with torch.no_grad():
        return model(tokens, positions=torch.arange(T).expand(B, T), mask=mask)


def max_diff_over_valid(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    return (a - b).abs()[valid].max().item()
