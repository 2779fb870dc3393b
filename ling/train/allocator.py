"""Keep freed memory for reuse: glibc's malloc tuned for a training loop (Linux, CPU).

A training step frees and reallocates the same activation buffers, step after step. By
default glibc gives large freed blocks back to the OS (munmap, or trimming the top of the
heap) and the next step page-faults the memory back in — on CPU that is 15–40 % of a
training step (measured in BENCHMARKS.md, "Pretraining"). Raising the mmap and trim
thresholds keeps freed memory in the process, where the next step reuses it.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
"""blocks up to this size come from the heap (glibc's largest allowed value on 64-bit)"""
TRIM_THRESHOLD = 1 << 30
"""free memory kept at the top of the heap before any is returned to the OS"""


def reuse_freed_memory() -> bool:
    """Apply the thresholds to this process; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # Setting either threshold also turns off glibc's own adjustment of both.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
