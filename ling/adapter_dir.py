"""LoRA adapter directories: what a LoRA fine-tuning run writes, and how it is opened.

An adapter directory holds `adapter.json` (the LoRA settings, the base it was trained on,
the vocabulary it needs), `adapter.safetensors` (`ling.lora.adapter_state_dict`, ling
names) and the tokenizer files. Opening one loads the base, grows its vocabulary as the
run did, applies and fills the adapter, and (by default) merges it into plain weights.

The base may be any checkpoint format, so its loader is passed in (`ling.checkpoint`
passes `load_checkpoint`): this module depends on the LoRA layer and the model only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ling.atomic import set_default_mode
from ling.dataclass_io import from_dict, to_dict
from ling.errors import LingError
from ling.lora import LoRAConfig, adapter_state_dict, apply_lora, load_adapter_state_dict, merge_lora
from ling.model import Transformer
from ling.tokenizer import Tokenizer
from ling.vocab import resize_vocab
from ling.weights import PRODUCER

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"

LoadBase = Callable[..., tuple[Transformer, Tokenizer | None]]
"""(path, device=, dtype=) → (model, tokenizer): how to open the base checkpoint."""


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def save_adapter(model: Transformer, config: LoRAConfig, directory: str | Path, base: str,
                 train_token_ids: list[int]) -> None:
    """Write the adapter tensors and what is needed to put them back on `base`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt", "producer": PRODUCER})
    set_default_mode(directory / ADAPTER_WEIGHTS)
    info = {"base": str(base), "lora": to_dict(config), "vocab_size": model.cfg.vocab_size,
            "train_token_ids": list(train_token_ids)}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(info, indent=2) + "\n")


def load_adapter_dir(directory: str | Path, load_base: LoadBase, base: str | None = None, device="cpu",
                     dtype: str | torch.dtype | None = None, merge: bool = True) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer): the base checkpoint named in the adapter (or `base`) with the adapter
    applied — merged into plain weights unless `merge=False`. The tokenizer is the adapter's."""
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
    model, tokenizer = load_base(base, device=device, dtype=dtype)
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
