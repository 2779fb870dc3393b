"""The run directory, its checkpoints, and everything exact resume needs.

```
RUN_DIR/
  config.yaml          the resolved configuration
  metrics.jsonl        one line per log step and per evaluation
  report.png           loss / throughput / learning-rate curves
  checkpoints/step-N/  config.json, model.safetensors, tokenizer files, train_state.pt
  latest -> checkpoints/step-N   the newest checkpoint
  best   -> checkpoints/step-M   the one with the lowest validation loss
```

A checkpoint is written into a temporary directory and renamed into place, so a crash
leaves either the whole checkpoint or none. `train_state.pt` is written last and records
the SHA-256 of the weights file; a checkpoint whose files are missing, unreadable or do not
match is reported and skipped when resuming. It holds only tensors and plain Python values,
so it loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ling.atomic import atomic_dir
from ling.config import ModelConfig
from ling.errors import LingError
from ling.weights import SafetensorsFiles, model_shapes, unwrap

TRAIN_STATE = "train_state.pt"
WEIGHTS = "model.safetensors"


# ---- RNG state ----------------------------------------------------------------------------
def rng_state() -> dict:
    """Every random number generator training draws from (dropout, shuffles, user code)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate wants the nested tuples random.getstate gave (a round trip may list them)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- files --------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_train_state(checkpoint: Path) -> dict:
    """The verified train state of a checkpoint; LingError saying what is wrong otherwise."""
    state_file = checkpoint / TRAIN_STATE
    if not state_file.exists():
        raise LingError(f"{checkpoint}: no {TRAIN_STATE} (not a resumable training checkpoint)")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn zip, garbage bytes, a foreign pickle
        raise LingError(f"{state_file}: unreadable ({type(e).__name__}: {e})") from None
    for name, digest in state.get("files", {}).items():
        path = checkpoint / name
        if not path.exists():
            raise LingError(f"{checkpoint}: {name} is missing")
        if sha256(path) != digest:
            raise LingError(f"{path}: contents do not match the checksum in {TRAIN_STATE} (torn or corrupt)")
    return state


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Copy a checkpoint's weights into `model` in place (the optimizer keeps its references)."""
    bare = unwrap(model)
    saved = ModelConfig.load(checkpoint / "config.json")
    if saved.to_dict() != bare.cfg.to_dict():
        ours, theirs = bare.cfg.to_dict(), saved.to_dict()
        diff = ", ".join(f"{k}: {theirs[k]!r} → {ours[k]!r}" for k in ours if ours[k] != theirs.get(k))
        raise LingError(f"{checkpoint}: the model config differs from the checkpoint's ({diff}); "
                        "resume with the same --model settings or start a new --out")
    shapes, params = model_shapes(bare), bare.state_dict()
    with SafetensorsFiles(checkpoint / WEIGHTS) as files:
        if sorted(files.names()) != sorted(shapes) or any(files.shape(n) != shapes[n] for n in shapes):
            raise LingError(f"{checkpoint / WEIGHTS}: its tensors do not fit this model")
        with torch.no_grad():
            for name in shapes:
                files.read_into(name, params[name])


# ---- the run directory ------------------------------------------------------------------
class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"

    def step_dirs(self) -> list[tuple[int, Path]]:
        """Complete-looking checkpoint directories `step-N`, oldest first (temporaries skipped)."""
        found = []
        if self.checkpoints.is_dir():
            for path in self.checkpoints.iterdir():
                if path.is_dir() and path.name.startswith("step-") and path.name[5:].isdigit():
                    found.append((int(path.name[5:]), path))
        return sorted(found)

    def save(self, step: int, write_weights: Callable[[Path], None], train_state: dict,
             keep_last: int, is_best: bool) -> Path:
        """Write checkpoint `step-N` atomically — `write_weights(tmp_dir)`, then train_state.pt
        with the checksums of those files — point `latest` (and `best`) at it, and delete
        all but the newest `keep_last` checkpoints (and the best)."""
        target = self.checkpoints / f"step-{step}"
        with atomic_dir(target, overwrite=True) as tmp:
            write_weights(tmp)
            files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            torch.save({**train_state, "files": files}, tmp / TRAIN_STATE)
        self._point("latest", target)
        if is_best:
            self._point("best", target)
        self.prune(keep_last)
        return target

    def _point(self, name: str, target: Path) -> None:
        """Replace the symlink RUN_DIR/name atomically with one to `target` (relative)."""
        link = self.root / name
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, self.root), tmp)
        os.replace(tmp, link)

    def pointed(self, name: str) -> Path | None:
        link = self.root / name
        return link.resolve() if link.is_symlink() and link.exists() else None

    def prune(self, keep_last: int) -> None:
        keep = {p for _, p in self.step_dirs()[-keep_last:]}
        best = self.pointed("best")
        for _, path in self.step_dirs():
            if path not in keep and path.resolve() != best:
                shutil.rmtree(path, ignore_errors=True)

    def clean_temporaries(self) -> None:
        """Remove temporary directories a killed run left behind."""
        if self.checkpoints.is_dir():
            for path in self.checkpoints.glob(".step-*.tmp-*"):
                shutil.rmtree(path, ignore_errors=True)

    def newest_valid(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that reads back intact, warning about each one skipped."""
        for step, path in reversed(self.step_dirs()):
            try:
                return path, read_train_state(path)
            except LingError as e:
                print(f"warning: skipping checkpoint step-{step}: {e}", file=sys.stderr)
        return None
