"""Helpers for training tests: a small char-level dataset directory made by `ling prepare`
(no network, no shared files) and a one-thread environment for training subprocesses."""

from __future__ import annotations

import os
import random
from pathlib import Path

from ling.data.prepare import PrepareArgs, prepare

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


def write_dataset(path: Path, text: str | None = None) -> Path:
    """A char-level dataset directory of `text` (default: `sample_text()`), split 90/10."""
    source = path.with_name(path.name + ".txt")
    source.write_text(text or sample_text())
    prepare(PrepareArgs(output=str(path), tokenizer="char", input=[str(source)]))
    return path


def one_thread_env() -> dict:
    """The environment for a training subprocess: tiny models run fastest on one thread, and on
    a busy machine several threads per process mostly wait for each other."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}
