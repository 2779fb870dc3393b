"""Opening a model from whatever a user points at: the one table of checkpoint formats.

Every command that takes a model (`generate`, `chat`, `serve`, `eval`, `finetune --base`,
the converters) calls `load_checkpoint(path)`, which accepts

- a GGUF file (`ling.gguf`: llama.cpp's format, dequantised on the fly);
- a LoRA adapter directory (`ling.adapter_dir`: its base, with the adapter merged in);
- a Hugging Face model directory (`ling.hf`: converted on the fly);
- a ling checkpoint directory (`ling.ling_dir`).

Each format is a reader in its own module that depends only downward (on the model, the
tokenizer and `ling.weights`); this module imports them and nothing above them — not
training, not serving. A reader that needs to open another checkpoint (an adapter's base)
is handed `load_checkpoint` rather than importing it. A new format is one more row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ling.adapter_dir import is_adapter_dir, load_adapter_dir
from ling.errors import LingError
from ling.gguf.reader import is_gguf_file, load_gguf
from ling.hf.checkpoint import is_hf_dir, load_hf_checkpoint
from ling.ling_dir import is_ling_dir, load_ling_dir, save_model_dir
from ling.model import Transformer
from ling.tokenizer import Tokenizer
from ling.weights import PRODUCER, resolve_dtype, unwrap, written_by_ling

__all__ = ["FORMATS", "PRODUCER", "Format", "is_hf_dir", "load_checkpoint", "resolve_dtype", "save_model_dir", "unwrap",
           "written_by_ling"]

Loaded = tuple[Transformer, Tokenizer | None]


@dataclass(frozen=True)
class Format:
    """One kind of checkpoint: how to recognise it, and how to open it."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., Loaded]
    """(path, device=, dtype=) → (model, tokenizer)"""


def _load_adapter(path: Path, device="cpu", dtype=None) -> Loaded:
    return load_adapter_dir(path, load_checkpoint, device=device, dtype=dtype)


FORMATS: tuple[Format, ...] = (
    Format("GGUF file", is_gguf_file, load_gguf),
    Format("LoRA adapter directory", is_adapter_dir, _load_adapter),
    Format("Hugging Face model directory", is_hf_dir, load_hf_checkpoint),
    Format("ling checkpoint directory", is_ling_dir, load_ling_dir),  # last: any other directory
)
"""In the order they are tried: the first whose `detect` accepts the path opens it."""


def is_run_dir(path: Path) -> bool:
    """A training run's directory (`ling pretrain` / `ling finetune` output): its checkpoints
    are inside, under checkpoints/ and the `best` / `latest` links."""
    return path.is_dir() and (path / "checkpoints").is_dir() and not (path / "config.json").exists()


def load_checkpoint(path: str | Path, device="cpu", dtype: str | torch.dtype | None = None) -> Loaded:
    """The model (and tokenizer, when the checkpoint has one) stored at `path`, in any of `FORMATS`.

    `dtype` None keeps the dtype the tensors are stored in.
    """
    path = Path(path)
    if not path.exists():
        raise LingError(f"{path}: no such checkpoint directory or .gguf file")
    if is_run_dir(path):
        best = "best" if (path / "best").exists() else "latest"
        raise LingError(f"{path} is a run directory, not a checkpoint: give {path / best} (its {best} checkpoint)")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt.load(path, device=device, dtype=dtype)
    raise LingError(f"{path}: not a checkpoint — ling opens a {', a '.join(f.name for f in FORMATS)}")
