"""Open a dataset directory written by `ling prepare`: memory-mapped token splits + tokenizer.

The splits stay on disk (np.memmap), so a corpus larger than RAM trains as well as a small
one. Opening checks what a trainer would otherwise trip over much later: a missing file, a
.bin whose size disagrees with meta.json, a tokenizer that is not the one the ids came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ling.errors import LingError, read_json
from ling.tokenizer import Tokenizer

DTYPES = ("uint16", "uint32")


@dataclass
class TokenDataset:
    path: Path
    meta: dict
    train: np.ndarray
    """train token ids (read-only memmap)"""
    val: np.ndarray
    tokenizer: Tokenizer

    @property
    def eos_id(self) -> int:
        return self.meta["special_ids"]["eos"]


def is_dataset_dir(path: str | Path) -> bool:
    """Whether `path` holds a dataset `ling prepare` wrote (its meta.json says so)."""
    try:
        meta = read_json(Path(path) / "meta.json")
    except LingError:
        return False
    return isinstance(meta, dict) and meta.get("format") == "ling-dataset"


def open_dataset(path: str | Path) -> TokenDataset:
    """Open `path` (a directory from `ling prepare`) for reading."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise LingError(f"{path}: not a dataset directory (no meta.json); create one with 'ling prepare'")
    meta = read_json(meta_file)
    missing = [k for k in ("dtype", "tokens", "tokenizer_hash", "vocab_size", "special_ids") if k not in meta]
    if missing:
        raise LingError(f"{meta_file}: missing {', '.join(missing)}; prepare the dataset again with 'ling prepare'")
    if meta["dtype"] not in DTYPES:
        raise LingError(f"{meta_file}: dtype must be one of {', '.join(DTYPES)}, got {meta['dtype']!r}")
    tokenizer = Tokenizer.load(path)
    if tokenizer.hash() != meta["tokenizer_hash"]:
        raise LingError(f"{path}/tokenizer.json is not the tokenizer these ids were made with "
                        f"(hash {tokenizer.hash()}, meta.json says {meta['tokenizer_hash']})")
    splits = {split: _map(path / f"{split}.bin", np.dtype(meta["dtype"]), meta["tokens"][split])
              for split in ("train", "val")}
    return TokenDataset(path, meta, splits["train"], splits["val"], tokenizer)


def _map(file: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    if not file.exists():
        raise LingError(f"{file}: missing; prepare the dataset again with 'ling prepare'")
    size = file.stat().st_size
    if size != n_tokens * dtype.itemsize:
        raise LingError(f"{file}: {size} bytes, but meta.json says {n_tokens} {dtype.name} tokens "
                        f"({n_tokens * dtype.itemsize} bytes); the dataset is damaged, prepare it again")
    if n_tokens == 0:  # an empty file cannot be memory-mapped
        return np.empty(0, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r")
