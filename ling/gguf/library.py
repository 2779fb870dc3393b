"""The `gguf` package (llama.cpp's gguf-py), imported once: it is an optional dependency."""

from __future__ import annotations

from ling.errors import LingError

try:
    import gguf
except ImportError:  # ling works without it; only GGUF files need it
    gguf = None


def require_gguf():
    """The `gguf` module, or a LingError saying how to install it."""
    if gguf is None:
        raise LingError("GGUF files need the gguf package: pip install 'ling[gguf]'")
    return gguf
