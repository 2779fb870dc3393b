"""The `gguf` package (llama.cpp's gguf-py): an optional dependency, imported on first use,
so that commands which never touch a GGUF file neither need it nor pay for importing it."""

from __future__ import annotations

import importlib
from functools import cache

from ling.errors import LingError


@cache
def require_gguf():
    """The `gguf` module, or a LingError saying how to install it."""
    try:
        return importlib.import_module("gguf")
    except ImportError:
        raise LingError("GGUF files need the gguf package: pip install -e '.[gguf]' (from the ling checkout)") from None
