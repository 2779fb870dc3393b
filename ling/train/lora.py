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
- An adapter directory holds `adapter.json` (LoRA settings, the base it was trained on, the
  vocabulary it needs) and `adapter.safetensors` (ling names), plus the tokenizer files;
  `load_with_adapter` rebuilds base + adapter from it. (`ling.hf.peft` writes the same
  tensors under PEFT's names for transformers users.)

Tokens a fine-tuning run adds to the vocabulary (the ChatML markers) have no useful base
embedding, so in LoRA runs their rows train too (`train_token_rows`, PEFT's
"trainable tokens"): a small parameter replaces those rows of the frozen embedding (and of
an untied LM head).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from ling.atomic import set_default_mode
from ling.config import ModelConfig
from ling.dataclass_io import from_dict, to_dict
from ling.errors import LingError
from ling.model import Transformer
from ling.train.vocab import resize_vocab

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
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
        linear = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None,
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

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy(0, self.ids, self.values.to(weight.dtype))


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


# ---- adapter directories -----------------------------------------------------------------
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def save_adapter(model: Transformer, config: LoRAConfig, directory: str | Path, base: str,
                 train_token_ids: list[int]) -> None:
    """Write the adapter tensors and what is needed to put them back on `base`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt", "producer": "ling"})
    set_default_mode(directory / ADAPTER_WEIGHTS)
    info = {"base": str(base), "lora": to_dict(config), "vocab_size": model.cfg.vocab_size,
            "train_token_ids": list(train_token_ids)}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(info, indent=2) + "\n")


def load_with_adapter(directory: str | Path, base: str | None = None, device="cpu", dtype=None, merge: bool = True):
    """(model, tokenizer): the base checkpoint named in the adapter (or `base`) with the adapter
    applied — merged into plain weights unless `merge=False`. The tokenizer is the adapter's."""
    from ling.checkpoint import load_checkpoint
    from ling.tokenizer import Tokenizer

    directory = Path(directory)
    where = directory / ADAPTER_CONFIG
    try:
        info = json.loads(where.read_text())
        config = from_dict(LoRAConfig, info["lora"], where=str(where))
        base = base or info["base"]
        vocab_size, token_ids = int(info["vocab_size"]), list(info["train_token_ids"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LingError(f"{where}: not a readable ling adapter config ({e})") from None
    if not Path(base).exists():
        raise LingError(f"{where}: the base model '{base}' does not exist; pass --base to say where it is now")
    model, tokenizer = load_checkpoint(base, device=device, dtype=dtype)
    if model.cfg.vocab_size > vocab_size:
        raise LingError(f"{where}: the adapter was trained for a vocabulary of {vocab_size} tokens, but "
                        f"'{base}' has {model.cfg.vocab_size}: is this the right base?")
    resize_vocab(model, vocab_size)
    apply_lora(model, config, token_ids)
    try:
        state = load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types on a corrupt file
        raise LingError(f"{directory / ADAPTER_WEIGHTS}: cannot read adapter weights ({e})") from None
    load_adapter_state_dict(model, state, str(directory / ADAPTER_WEIGHTS))
    if token_ids and state["embed.token_rows.ids"].tolist() != token_ids:
        raise LingError(f"{directory}: {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG} disagree on the trained token ids")
    if (directory / "tokenizer.json").exists():
        tokenizer = Tokenizer.load(directory)
    return (merge_lora(model) if merge else model), tokenizer


# ---- `ling merge` ------------------------------------------------------------------------
@dataclass
class MergeArgs:
    """Fold a LoRA adapter into its base model and write a plain checkpoint directory."""

    adapter: str
    """adapter directory (a LoRA run's output, or one of its checkpoints)"""
    out: str
    """where to write the merged checkpoint"""
    base: Optional[str] = None
    """base checkpoint or Hugging Face directory (default: the one recorded in the adapter)"""
    dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None
    """dtype of the merged weights (default: the base's)"""
    overwrite: bool = False
    """replace `out` if it holds a ling checkpoint (swapped once the merged one is complete)"""


def merge(args: MergeArgs) -> None:
    from ling.atomic import atomic_dir, check_output_dir
    from ling.checkpoint import is_hf_dir, save_model_dir, written_by_ling
    from ling.train.heads import HEAD_CONFIG, HEAD_WEIGHTS

    if not is_adapter_dir(args.adapter):
        raise LingError(f"{args.adapter}: no {ADAPTER_CONFIG} here — give the output directory of a LoRA run")
    check_output_dir(args.out, args.overwrite, lambda path: written_by_ling(path) and not is_hf_dir(path),
                     "a checkpoint")
    model, tokenizer = load_with_adapter(args.adapter, args.base, dtype=args.dtype)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        save_model_dir(model, tokenizer, tmp)
        for name in (HEAD_CONFIG, HEAD_WEIGHTS):  # a classifier's head stays beside its body
            if (Path(args.adapter) / name).exists():
                shutil.copyfile(Path(args.adapter) / name, tmp / name)
    print(f"merged {args.adapter} into its base: {model.num_params():,} parameters written to {args.out}")
