"""ling checkpoint directories: `config.json` + `model.safetensors` + tokenizer files.

This is what training writes and what every command that takes a model accepts (training
run checkpoints add a `train_state.pt` beside these, see `ling.train`). Parameter names
are the plain names of `ling.model.Transformer` — never `_orig_mod.` or `module.`
prefixes — and a tied LM head is stored once (as `embed.weight`).

Loading builds the model on the meta device, then copies each tensor from the
memory-mapped safetensors file straight into its final place, so a checkpoint is never
held twice in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ling.atomic import set_default_mode
from ling.config import ModelConfig
from ling.errors import LingError
from ling.model import Transformer, build_model
from ling.tokenizer import Tokenizer
from ling.weights import PRODUCER, SafetensorsFiles, clean_state_dict, load_tensors, resolve_dtype, unwrap


def is_ling_dir(path: Path) -> bool:
    """Any directory that is no other format's: a ling checkpoint, or the error says what it lacks."""
    return path.is_dir()


def load_ling_dir(path: Path, device="cpu", dtype: str | torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """The model (and tokenizer, if saved) of a ling checkpoint directory."""
    if not (path / "config.json").exists():
        raise LingError(f"{path}: missing config.json — is this a checkpoint directory?")
    cfg = ModelConfig.load(path / "config.json")
    weights = path / "model.safetensors"
    if not weights.exists():
        raise LingError(f"{path}: missing model.safetensors")
    model = build_model(cfg, device="meta", init=False)
    with SafetensorsFiles(weights) as files:
        load_tensors(model, files, where=str(weights), device=device, dtype=resolve_dtype(dtype))
    model.init_buffers()
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    return model, tokenizer


def save_model_dir(model: Transformer, tokenizer: Tokenizer | None, directory: str | Path) -> None:
    """Write config.json, model.safetensors and the tokenizer files into `directory`.

    Callers that need atomicity write into `ling.atomic.atomic_dir`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bare = unwrap(model)
    bare.cfg.save(directory / "config.json")
    tensors = {k: v.detach().contiguous().cpu() for k, v in clean_state_dict(bare).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt", "producer": PRODUCER})
    set_default_mode(directory / "model.safetensors")
    if tokenizer is not None:
        tokenizer.save(directory)
