"""Write-then-rename, so a crash or an error never leaves a half-written output behind.

Outputs are written into a temporary sibling named `.NAME.tmp-PID-XXXX`, which becomes
NAME only when complete. Replacing an existing directory swaps the two in one step
(Linux `renameat2(RENAME_EXCHANGE)`), so the path is never missing; where the kernel or
file system lacks it, the old one is renamed aside and deleted only once the new one is in
place. A temporary left by a killed run (its PID gone and its lock free) is removed the next
time the same output is written. What may be replaced at all is decided before any work,
by `check_output_dir`: an empty directory, or one holding ling's own artifact of the same kind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ling.errors import LingError

try:
    import fcntl
except ImportError:  # not on Windows: temporaries are then told apart by their PID alone
    fcntl = None


def check_output_dir(target: str | Path, overwrite: bool, is_ours: Callable[[Path], bool], what: str) -> Path:
    """Refuse, with one line, an output directory ling must not write: a symlink, a file, or
    a non-empty directory — unless `overwrite` and it holds `what` (e.g. "a dataset") ling
    wrote, as `is_ours` tells. An empty directory is replaced either way."""
    target = Path(target)
    if target.is_symlink():
        raise LingError(f"{target} is a symlink (to {os.readlink(target)}): give the real path to write")
    if not target.exists():
        return target
    if not target.is_dir():
        raise LingError(f"{target} exists and is not a directory; choose another path")
    if not any(target.iterdir()):
        return target
    if not overwrite:
        raise LingError(f"{target} already exists; pass --overwrite to replace it")
    if not is_ours(target):
        raise LingError(f"{target} does not hold {what} ling wrote, so --overwrite does not replace it: "
                        "move it away or choose another path")
    return target


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside `target`; on success it becomes `target`.

    On any exception the temporary directory is removed and `target` is untouched. With
    `overwrite`, an existing `target` is swapped for the new one once that is complete
    (callers check first, with `check_output_dir`, that it may be). Without it, only an
    empty directory may stand at `target` when the new one is ready; anything else (another
    run's output that appeared meanwhile) is a LingError, and nothing is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=target.parent))
    held = _hold(tmp)
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); give it the usual mode
    try:
        yield tmp
        _fsync_tree(tmp)
        if overwrite and target.exists() and not target.is_symlink():
            _replace_dir(tmp, target)
        else:
            try:
                os.rename(tmp, target)  # also over an empty directory, never over a non-empty one
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise LingError(f"{target} appeared while this run was writing it (another run?): "
                                "left it as it is, and discarded this run's output") from None
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release(held)


@contextmanager
def atomic_file(target: str | Path, mode: str = "w"):
    """Yield a file object for a temporary file beside `target`; on success it becomes `target`."""
    with atomic_path(target) as tmp:
        with open(tmp, mode) as f:
            yield f


@contextmanager
def atomic_path(target: str | Path):
    """Yield the path of a temporary file beside `target`, for writers that open files
    themselves (gguf-py's); on success it is synced and becomes `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(target), dir=target.parent)
    os.close(fd)
    held = _hold(Path(tmp))
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _release(held)


def set_default_mode(path: str | Path) -> None:
    """Give a file the mode a new file gets (0666 less the umask: 0644 usually), as writers
    that create files private (0600), such as safetensors' `save_file`, do not."""
    os.chmod(path, 0o666 & ~_umask())


# ---- temporaries ---------------------------------------------------------------------------
def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def clean_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove the temporaries of `target` that killed runs left behind (their process is gone
    and nothing holds their lock); returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        if _stale(path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _stale(path: Path) -> bool:
    pid = path.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
    if pid.isdigit() and _alive(int(pid)):
        return False
    held = _hold(path, wait=False)
    if held is None:  # locked: a writer (e.g. in another PID namespace) is still at work
        return False
    _release(held)
    return True


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _hold(path: Path, wait: bool = True) -> int | None:
    """An exclusive flock on `path` (a file or a directory), held while the fd is open; None if
    another process holds it (or it vanished). -1 where there is no flock."""
    if fcntl is None:
        return -1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None if not wait else -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _release(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)


# ---- swapping directories ------------------------------------------------------------------
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where it is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a kernel or file system without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`, deleting what was there, without `target` ever missing
    (or, without RENAME_EXCHANGE, the old one kept until the new one is in place)."""
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old directory
        return
    old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target) + "old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
