"""Where ling keeps what it measures or downloads once per machine: one directory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LING_CACHE, else $XDG_CACHE_HOME/ling, else ~/.cache/ling."""
    if os.environ.get("LING_CACHE"):
        return Path(os.environ["LING_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ling"
