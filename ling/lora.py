"""LoRA: train a low-rank update B·A beside each frozen weight instead of the weight itself.

`apply_lora(model, LoRAConfig(...))` swaps the targeted `nn.Linear`s of a `Transformer`
for `LoRALinear`s and freezes everything else. Targets are named as in the papers and in
PEFT — q, k, v, o, gate, up, down. Our attention fuses q, k and v into one `attn.qkv`
([q | k | v] output rows), so an adapter on q adapts exactly the q rows of that matmul: one
`(A, B)` pair per target, which is also what PEFT holds for separate q_proj/k_proj/v_proj.

- B starts at zero, so before the first step the model computes exactly the base model.
- The update is scaled by alpha / rank and dropout applies to the adapter's input (PEFT's
  conventions, so an exported adapter means the same thing there).
- `LoRALinear` keeps the base `weight`/`bias` under their own names: the base part of the
  state dict is unchanged, adapter tensors are the `lora_A.<target>` / `lora_B.<target>` extras.
- `merge_lora` folds every update into its weight and returns a plain `Transformer`.
- `adapter_state_dict` is only what training changed, under ling names: `ling.adapter_dir`
  stores it as an adapter directory (and loads base + adapter back), `ling.hf.peft` writes
  the same tensors under PEFT's names for transformers users.

This lives below `train/` because inference needs it too: a LoRA run's output is a
checkpoint that `generate`, `serve` or `eval` open by merging the adapter into its base.

Tokens a fine-tuning run adds to the vocabulary (the ChatML markers) have no useful base
embedding, so in LoRA runs their rows train too (`train_token_rows`, PEFT's
"trainable tokens"): a small parameter replaces those rows of the frozen embedding (and of
an untied LM head).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ling.config import ModelConfig
from ling.errors import LingError
from ling.model import Transformer

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters (used with --method lora)."""

    rank: int = 8
    """rank r of each update B·A (B: out × r, A: r × in)"""
    alpha: float = 16.0
    """the update is scaled by alpha / rank"""
    dropout: float = 0.05
    """dropout on the adapter's input"""
    targets: str = "all"
    """comma-separated projections to adapt — q, k, v, o, gate, up, down — or 'all' (every one
    this model has: gate only in SwiGLU MLPs)"""

    def target_list(self, cfg: ModelConfig) -> list[str]:
        if self.targets.strip() == "all":
            return [t for t in TARGETS if t != "gate" or cfg.mlp == "swiglu"]
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        bad = [t for t in names if t not in TARGETS]
        if bad or not names:
            raise LingError(f"--lora.targets: unknown target(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TARGETS)} or 'all'")
        return names

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_slices(model: Transformer, targets: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per block-relative module path, the output-row slice each target adapts."""
    cfg = model.cfg
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    layout = {
        "q": ("attn.qkv", (0, q)), "k": ("attn.qkv", (q, q + kv)), "v": ("attn.qkv", (q + kv, q + 2 * kv)),
        "o": ("attn.o", (0, cfg.n_embd)), "gate": ("mlp.gate", (0, cfg.mlp_hidden)),
        "up": ("mlp.up", (0, cfg.mlp_hidden)), "down": ("mlp.down", (0, cfg.n_embd)),
    }
    if "gate" in targets and cfg.mlp != "swiglu":
        raise LingError("--lora.targets: 'gate' needs a SwiGLU MLP; this model's MLP has only up and down")
    slices: dict[str, dict[str, tuple[int, int]]] = {}
    for target in targets:
        path, rows = layout[target]
        slices.setdefault(path, {})[target] = rows
    return slices


class LoRALinear(nn.Module):
    """A frozen linear map plus low-rank updates, each on a slice of the output rows."""

    def __init__(self, linear: nn.Linear, slices: dict[str, tuple[int, int]], rank: int, alpha: float, dropout: float):
        super().__init__()
        self.linear_type = type(linear)
        """the class of the layer this wraps, which `merged` gives back"""
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.slices = dict(slices)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        device = linear.weight.device
        self.lora_A = nn.ParameterDict({
            name: nn.Parameter(torch.empty(rank, linear.in_features, device=device)) for name in slices
        })
        self.lora_B = nn.ParameterDict({
            name: nn.Parameter(torch.zeros(end - start, rank, device=device)) for name, (start, end) in slices.items()
        })
        for A in self.lora_A.values():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as PEFT and nn.Linear initialise
        self.disabled = False
        """compute the base layer alone (see `adapters_disabled`)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return y
        h = self.dropout(x)
        for name, (start, end) in self.slices.items():
            delta = F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name]) * self.scale
            if end - start == y.shape[-1]:
                y = y + delta
            else:
                y[..., start:end] = y[..., start:end] + delta
        return y

    def delta_weight(self) -> torch.Tensor:
        """The whole update as one matrix shaped like `weight` (zero outside the targeted rows)."""
        delta = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        for name, (start, end) in self.slices.items():
            delta[start:end] = self.lora_B[name].float() @ self.lora_A[name].float() * self.scale
        return delta

    def merged(self) -> nn.Linear:
        linear = self.linear_type(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        linear.weight = nn.Parameter((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear


class _ReplaceRows(nn.Module):
    """Parametrization W → W with rows `ids` replaced by trainable `values`."""

    def __init__(self, weight: torch.Tensor, ids: list[int]):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=weight.device))
        self.values = nn.Parameter(weight.detach()[self.ids].float().clone())
        self.disabled = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return weight
        return weight.index_copy(0, self.ids, self.values.to(weight.dtype))


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, `model` computes its frozen base: every LoRA update and trained token row is
    skipped (PEFT's `disable_adapter`). Preference tuning's reference model is this — the
    same weights in memory, not a second copy."""
    layers = [m for m in model.modules() if isinstance(m, (LoRALinear, _ReplaceRows))]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def apply_lora(model: Transformer, config: LoRAConfig, train_token_ids: list[int] = ()) -> Transformer:
    """Freeze `model` and add LoRA adapters (in place); `train_token_ids` rows of the embedding train too."""
    targets = config.target_list(model.cfg)
    if config.rank <= 0:
        raise LingError(f"--lora.rank must be positive, got {config.rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for path, slices in target_slices(model, targets).items():
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            lora = LoRALinear(getattr(parent, name), slices, config.rank, config.alpha, config.dropout)
            setattr(parent, name, lora)
    if train_token_ids:
        train_token_rows(model, list(train_token_ids))
    return model


def train_token_rows(model: Transformer, ids: list[int]) -> None:
    """Let rows `ids` of the (frozen) embedding — and of an untied LM head — train."""
    rows = _ReplaceRows(model.embed.weight, ids)
    head_rows = rows if model.cfg.tie_embeddings else _ReplaceRows(model.lm_head.weight, ids)
    parametrize.register_parametrization(model.embed, "weight", rows)
    # A tied head still holds the embedding's tensor: the same module replaces the same rows there.
    parametrize.register_parametrization(model.lm_head, "weight", head_rows)


def token_rows(model: Transformer) -> dict[str, _ReplaceRows]:
    """The trainable-row parametrizations: {'embed': …, 'lm_head': …} (the tied head shares embed's)."""
    found = {}
    for name in ("embed", "lm_head"):
        module = getattr(model, name)
        if parametrize.is_parametrized(module, "weight"):
            found[name] = module.parametrizations.weight[0]
    return found


def adapter_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Only what training changed: LoRA A/B and trained token rows, under ling names."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            for target in module.slices:
                state[f"{name}.lora_A.{target}"] = module.lora_A[target].detach()
                state[f"{name}.lora_B.{target}"] = module.lora_B[target].detach()
    for name, rows in token_rows(model).items():
        if name == "lm_head" and model.cfg.tie_embeddings:
            continue
        state[f"{name}.token_rows.ids"] = rows.ids
        state[f"{name}.token_rows.values"] = rows.values.detach()
    return state


def load_adapter_state_dict(model: Transformer, state: dict[str, torch.Tensor], where: str) -> None:
    """Put adapter tensors saved by `adapter_state_dict` into a model prepared by `apply_lora`."""
    own = adapter_state_dict(model)
    for name, tensor in state.items():
        if name not in own:
            raise LingError(f"{where}: unexpected adapter tensor '{name}' (does --lora.targets match the adapter's?)")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise LingError(f"{where}: adapter tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
    missing = sorted(set(own) - set(state))
    if missing:
        raise LingError(f"{where}: missing adapter tensor(s) {', '.join(missing[:3])}")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                for target in module.slices:
                    module.lora_A[target].copy_(state[f"{name}.lora_A.{target}"])
                    module.lora_B[target].copy_(state[f"{name}.lora_B.{target}"])
        for name, rows in token_rows(model).items():
            key = f"{name}.token_rows.values"
            if key in state:
                rows.values.copy_(state[key])


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its weight (in place): a plain `Transformer`, base names only."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    for name in token_rows(model):
        parametrize.remove_parametrizations(getattr(model, name), "weight", leave_parametrized=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    for p in model.parameters():
        p.requires_grad_(True)
    return model
