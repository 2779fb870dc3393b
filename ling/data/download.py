"""Download a URL once into ling's cache: atomically (a failed download leaves nothing behind,
so the next run tries again) and with a progress bar."""

from __future__ import annotations

import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from ling.atomic import atomic_file
from ling.cache import cache_dir
from ling.errors import LingError


def cached_path(url: str) -> Path:
    """Where `url` is kept: named after the URL's hash (two URLs never collide) and its file
    name (so the file keeps its suffix, which says its format)."""
    name = Path(urlparse(url).path).name or "download"
    return cache_dir() / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


def download(url: str) -> Path:
    """The local copy of `url`, downloading it first if it is not cached yet."""
    target = cached_path(url)
    if target.exists():
        print(f"using the cached copy of {url} ({target})", file=sys.stderr)
        return target
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with atomic_file(target, "wb") as f, tqdm(
                total=total, unit="B", unit_scale=True, desc=f"downloading {target.name.split('-', 1)[1]}"
            ) as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        raise LingError(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise LingError(f"{url}: download failed ({reason}); check the address and the connection") from None
    return target
