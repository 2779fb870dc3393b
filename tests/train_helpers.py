"""Helpers for training tests: a small char-level dataset directory (no network, no shared
files) and a one-thread environment for training subprocesses."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np

from ling.tokenizer import Tokenizer

WORDS = ("the king and queen of the north sent word to all the lords that the war was over "
         "now let us sing and feast for the night is long and the wine is sweet").split()


def sample_text(n_words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = rng.randint(4, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return "\n".join(lines) + "\n"


def write_dataset(path: Path, text: str | None = None, val_fraction: float = 0.1) -> Path:
    """train.bin / val.bin / meta.json / tokenizer.json as `ling prepare --tokenizer char` lays them out."""
    text = text or sample_text()
    tokenizer = Tokenizer.train_char([text])
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    n_val = int(len(ids) * val_fraction)
    path.mkdir(parents=True, exist_ok=True)
    ids[:-n_val].tofile(path / "train.bin")
    ids[-n_val:].tofile(path / "val.bin")
    tokenizer.save(path)
    meta = {"dtype": "uint16", "train_tokens": len(ids) - n_val, "val_tokens": n_val,
            "tokenizer_hash": tokenizer.hash()}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def one_thread_env() -> dict:
    """The environment for a training subprocess: tiny models run fastest on one thread, and on
    a busy machine several threads per process mostly wait for each other."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}
