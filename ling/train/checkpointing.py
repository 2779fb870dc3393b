"""The run directory, its checkpoints, and everything exact resume needs.

```
RUN_DIR/
  config.yaml          the resolved configuration
  metrics.jsonl        one line per log step and per evaluation
  report.png           loss / throughput / learning-rate curves
  checkpoints/step-N/  config.json, model.safetensors, tokenizer files, train_state.pt
                       (+ train_state.dcp/: the sharded training state of an FSDP run)
  latest -> checkpoints/step-N   the newest checkpoint
  best   -> checkpoints/step-M   the one with the lowest validation loss
  .ling.lock           held (fcntl.flock) by the one process writing the run; holds its PID
```

A checkpoint is written into a temporary directory and renamed into place, so a crash
leaves either the whole checkpoint or none. `train_state.pt` is written last and records
the SHA-256 of every other file (the shards of an FSDP run's `train_state.dcp/` too); a
checkpoint whose files are missing, unreadable or do not match is reported and skipped
when resuming. It holds only tensors and plain Python values,
so it loads with `torch.load(..., weights_only=True)`.

What ling may delete or replace in a run directory is what it wrote: a checkpoint
directory counts as ling's when its train_state.pt reads back and the directory holds no
file besides those train_state.pt lists. Anything else — a folder of the user's in a
symlinked checkpoints/, a checkpoint whose train_state.pt was damaged, a real directory
named `latest` — is never deleted or overwritten: pruning leaves it, and a run that would
overwrite it does not start (it says what to move, or how to start from intact weights).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import sys
import warnings
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
LOCK = ".ling.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "report.png", "tensorboard", "samples.jsonl", "summary.json")
"""what runs write at the top of a run directory (never through a symlink planted there)"""
POINTERS = ("latest", "best")


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


def load_train_state(state_file: Path, mmap: bool = False) -> dict:
    """train_state.pt as plain values (weights_only); a LingError of one line otherwise."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it better
            warnings.simplefilter("ignore")
            state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a torn zip, garbage bytes, a foreign or malicious pickle
        raise LingError(f"{state_file}: unreadable ({_load_error(e)})") from None
    if not isinstance(state, dict):
        raise LingError(f"{state_file}: unreadable (holds a {type(state).__name__}, not a train state)")
    return state


def _load_error(e: Exception) -> str:
    """torch.load's reason in a few words (its weights-only refusal is a page of advice)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].split(". ")[0]
        return f"it holds more than tensors and plain values, so it was not unpickled: {reason}"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def read_train_state(checkpoint: Path) -> dict:
    """The verified train state of a checkpoint; LingError saying what is wrong otherwise."""
    state_file = checkpoint / TRAIN_STATE
    if not state_file.exists():
        raise LingError(f"{checkpoint}: no {TRAIN_STATE} (not a resumable training checkpoint)")
    state = load_train_state(state_file)
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
    ours, theirs = bare.cfg.to_dict(), saved.to_dict()
    ours.pop("name"), theirs.pop("name")  # informational: the preset a shape started from
    if ours != theirs:
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


def intact_weights(checkpoint: Path) -> bool:
    """Whether a checkpoint's weights read back (safetensors files whose headers fit their
    sizes, beside a config that parses): worth starting a new run from, even without its
    train state."""
    files = sorted(checkpoint.glob("*.safetensors"))
    configs = [c for c in (checkpoint / "config.json", checkpoint / "adapter_config.json") if c.is_file()]
    if not files or not configs:
        return False
    try:
        for config in configs:
            json.loads(config.read_text(encoding="utf-8"))
        SafetensorsFiles(*files).close()
    except (LingError, OSError, ValueError):
        return False
    return True


# ---- the run directory ------------------------------------------------------------------
class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self._lock = None
        self._warned: set[Path] = set()

    # ---- one writer ----------------------------------------------------------------------
    def open(self) -> None:
        """Create the run directory and take its lock for this process, or raise a LingError
        saying why it cannot be used: --out is a file, a dangling symlink or a loop; another
        process writes it; a pointer or run file is not what ling writes."""
        root = self.root
        try:
            is_dir = stat.S_ISDIR(os.stat(root).st_mode)
        except FileNotFoundError:
            if root.is_symlink():
                raise LingError(f"{root}: a symlink to {os.readlink(root)}, which does not exist; "
                                "remove it or choose another --out") from None
            is_dir = None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LingError(f"{root}: a symlink loop; remove it or choose another --out") from None
            raise LingError(f"{root}: cannot be used as the run directory ({e.strerror})") from None
        if is_dir is False:
            raise LingError(f"{root}: exists and is not a directory; choose another --out")
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            where = root / LOCK if e.errno == errno.ELOOP else root
            raise LingError(f"cannot use {where} for the run ({e.strerror})") from None
        lock = os.fdopen(fd, "r+")
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock on this platform: no protection, as before
            pass
        except BlockingIOError:
            pid = lock.read().strip() or "?"
            lock.close()
            raise LingError(f"{root} is in use by another ling run (PID {pid}): wait for it to finish, "
                            "or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock
        self._check_entries()

    def close(self) -> None:
        """Release the lock (the lock file stays: removing it would race with a new writer)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _check_entries(self) -> None:
        for name in POINTERS:
            path = self.root / name
            if (path.exists() or path.is_symlink()) and not path.is_symlink():
                kind = "directory" if path.is_dir() else "file"
                raise LingError(f"{path} is a {kind}, not ling's pointer to a checkpoint (a symlink): "
                                "move it away, or choose another --out")
        for name in RUN_FILES:
            if (self.root / name).is_symlink():
                raise LingError(f"{self.root / name} is a symlink: ling does not write run files through "
                                "symlinks; remove it, or choose another --out")
        if self.checkpoints.exists() and not self.checkpoints.is_dir():
            raise LingError(f"{self.checkpoints} is not a directory: move it away, or choose another --out")

    # ---- what ling wrote ------------------------------------------------------------------
    def is_ours(self, checkpoint: Path) -> bool:
        """A checkpoint directory (not a symlink to one) whose train_state.pt reads back and
        which holds only the files it lists: one ling wrote, safe to replace or prune."""
        if checkpoint.is_symlink() or not checkpoint.is_dir():
            return False
        try:
            files = load_train_state(checkpoint / TRAIN_STATE, mmap=True).get("files")
        except LingError:
            return False
        if not isinstance(files, dict):
            return False
        return {p.name for p in checkpoint.iterdir()} <= {*(name.split("/")[0] for name in files), TRAIN_STATE}

    def refuse_to_overwrite(self, resumed_step: int, hint: Callable[[Path], str]) -> None:
        """Raise a LingError if continuing from `resumed_step` would one day overwrite a
        checkpoint directory that is not ling's (see `is_ours`)."""
        for step, path in self.step_dirs():
            if step > resumed_step and not self.is_ours(path):
                raise LingError(f"{path} is not a checkpoint ling can resume or replace, and this run would "
                                f"overwrite it at step {step}: move it out of {self.checkpoints}"
                                + (f", or start a new run from its intact weights: {hint(path)}"
                                   if intact_weights(path) else ""))

    def _warn_once(self, path: Path, message: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            print(f"warning: {message}", file=sys.stderr)

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
        if (target.exists() or target.is_symlink()) and not self.is_ours(target):
            raise LingError(f"{target} appeared during the run and is not a checkpoint ling wrote: "
                            "not overwriting it (move it away and resume with --resume auto)")
        with atomic_dir(target, overwrite=True) as tmp:
            write_weights(tmp)
            files = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
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
        """Delete all but the newest `keep_last` checkpoints and the best — those ling wrote;
        a directory that is not (see `is_ours`) is left where it is, with a warning."""
        keep = {p for _, p in self.step_dirs()[-keep_last:]}
        best = self.pointed("best")
        for _, path in self.step_dirs():
            if path in keep or path.resolve() == best:
                continue
            if self.is_ours(path):
                shutil.rmtree(path)
            else:
                self._warn_once(path, f"left {path} in place: not a checkpoint ling wrote (or its {TRAIN_STATE} "
                                      "is damaged, or it holds other files)")

    def clean_temporaries(self) -> None:
        """Remove what killed runs of this directory left behind: half-written checkpoint
        directories and pointer symlinks, under ling's own temporary names (called with the lock held)."""
        leftovers = list(self.root.glob(".latest.tmp-*")) + list(self.root.glob(".best.tmp-*"))
        if self.checkpoints.is_dir():
            leftovers += self.checkpoints.glob(".step-*.tmp-*")
        for path in leftovers:
            if path.is_symlink() or not path.is_dir():
                path.unlink(missing_ok=True)
            else:
                shutil.rmtree(path, ignore_errors=True)

    def newest_valid(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that reads back intact, warning about each one skipped."""
        for step, path in reversed(self.step_dirs()):
            try:
                return path, read_train_state(path)
            except LingError as e:
                print(f"warning: skipping checkpoint step-{step}: {e}", file=sys.stderr)
        return None
