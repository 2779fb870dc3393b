"""Choosing a kernel by timing the candidates on the machine at hand.

Which implementation is fastest depends on the CPU (AMX or not, its memory bandwidth, its
cache sizes), the thread count, the torch version and the model's shapes — a choice tuned
on one machine does not transfer. So each choice is a short race between the candidates on
the model's real shapes, run once per machine: the winner is remembered in `kernels.json`
in ling's cache directory (`$LING_CACHE`, else ~/.cache/ling), keyed by all of the above.
A damaged cache file is measured again (with a one-line warning), never a crash.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable

import torch

from ling.atomic import atomic_file
from ling.cache import cache_dir
from ling.device import cpu_name
from ling.kernels.report import Choice

CACHE_FILE = "kernels.json"


def machine_key(device: torch.device) -> str:
    """What a measurement depends on besides the shapes: the chip, threads and torch version."""
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return f"{chip}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Probe:
    """Races candidates, at most `seconds` per decision, and caches the winners.

    `refresh=True` ignores what is cached (the winners are still written back)."""

    def __init__(self, device: torch.device, seconds: float = 0.5, refresh: bool = False):
        self.device, self.seconds, self.refresh = torch.device(device), seconds, refresh
        self._path = cache_dir() / CACHE_FILE
        self._known: dict | None = None

    def _load(self) -> dict:
        if self._known is None:
            self._known = {}
            if self._path.exists():
                try:
                    known = json.loads(self._path.read_text())
                    if not isinstance(known, dict):
                        raise ValueError("not a JSON object")
                    self._known = known
                except (OSError, ValueError, UnicodeDecodeError) as e:
                    print(f"warning: {self._path} is unreadable ({e}); measuring the kernels again", file=sys.stderr)
        return self._known

    def _save(self) -> None:
        try:
            with atomic_file(self._path) as f:
                json.dump(self._known, f, indent=1)
        except OSError:
            pass  # a read-only home only costs a measurement next time

    def pick(self, part: str, shape: str, candidates: dict[str, Callable[[], object]]) -> Choice:
        """The fastest of `candidates` (name → a zero-argument call) for `part` at `shape`.

        A candidate that raises is out of the race; the first one listed is the fallback."""
        key = f"{machine_key(self.device)}|{part}|{shape}"
        known = self._load()
        entry = known.get(key)
        if (not self.refresh and isinstance(entry, dict) and entry.get("picked") in candidates
                and isinstance(entry.get("seconds"), dict)):
            return Choice(part, entry["picked"], "cached", dict(entry["seconds"]))
        seconds = race(candidates, self.seconds, self.device)
        picked = min(seconds, key=seconds.get) if seconds else next(iter(candidates))
        known[key] = {"picked": picked, "seconds": seconds}
        self._save()
        return Choice(part, picked, "measured", seconds)


def race(candidates: dict[str, Callable[[], object]], budget: float, device: torch.device) -> dict[str, float]:
    """Best time of one call of each candidate, in interleaved rounds (so that a neighbour's
    load slows all of them alike) until `budget` seconds are spent: at least three rounds,
    or one where a single call is long."""
    alive, first = {}, {}
    for name, call in candidates.items():  # a first call: warm-up, and out if it fails
        try:
            t0 = time.perf_counter()
            call()
            _sync(device)
            first[name] = time.perf_counter() - t0
            alive[name] = call
        except Exception:  # noqa: BLE001 — any failure means "not available here"
            continue
    if not alive:
        return {}
    min_rounds = 3 if sum(first.values()) < budget / 4 else 1
    best = {name: float("inf") for name in alive}
    started, rounds = time.perf_counter(), 0
    while (rounds < min_rounds or time.perf_counter() - started < budget) and rounds < 50:
        for name, call in alive.items():
            t0 = time.perf_counter()
            call()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
        rounds += 1
    return best
