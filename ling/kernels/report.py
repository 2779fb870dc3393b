"""What the kernels decided for one model on one machine, in a form commands print and log."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ling.dataclass_io import closest
from ling.errors import LingError

MODES = ("auto", "reference")
"""`--kernels`: auto = measure the candidates here and keep the fastest; reference = the plain model"""


def check_mode(mode: str) -> str:
    """`mode` if it is a valid `--kernels` value, else a LingError naming the closest one."""
    if mode not in MODES:
        hint = closest(mode, list(MODES))
        raise LingError(f"unknown --kernels '{mode}'" + (f"; did you mean '{hint}'?" if hint else "")
                        + f" (choose one of: {', '.join(MODES)})")
    return mode


@dataclass
class Choice:
    """One decision: which implementation of one part of the model runs, and why."""

    part: str
    """what was decided: attention, gelu, linear 768x2432, kv_cache, compile, ..."""
    picked: str
    how: str
    """'measured' (timed now), 'cached' (timed earlier on this machine), 'rule' (no candidate
    to time: the only way that works here), or 'reference'"""
    seconds: dict[str, float] = field(default_factory=dict)
    """the measured time of one call of each candidate, the reference (the plain model's way) first"""

    @property
    def speedup(self) -> float | None:
        """How many times faster the pick is than the reference candidate (None: not measured)."""
        if self.picked not in self.seconds or not self.seconds:
            return None
        reference = next(iter(self.seconds.values()))
        return reference / self.seconds[self.picked] if self.seconds[self.picked] > 0 else None


@dataclass
class KernelReport:
    """Every choice made for one model; `summary()` for a command's output, `to_dict()` for
    metrics.jsonl and the server's /health."""

    mode: str = "reference"
    choices: list[Choice] = field(default_factory=list)

    def add(self, choice: Choice) -> Choice:
        self.choices.append(choice)
        return choice

    def picked(self, part: str) -> str | None:
        return next((c.picked for c in self.choices if c.part == part), None)

    def summary(self) -> str:
        """One line: each part's pick and its speed-up over the reference; the linear layers of
        all weight shapes together."""
        if not self.choices:
            return "kernels: reference (the plain model)" if self.mode == "reference" else "kernels: none apply here"
        parts, linears = [], {}
        for c in self.choices:
            if c.part.startswith("linear "):
                linears.setdefault(c.picked, []).append(c)
            else:
                parts.append(f"{c.part}: {c.picked}" + _gain([c]))
        for picked, group in linears.items():
            parts.append(f"linear: {picked} for {len(group)} of {sum(map(len, linears.values()))} shapes" + _gain(group))
        return "kernels: " + " · ".join(parts)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "choices": [asdict(c) for c in self.choices]}


def _gain(choices: list[Choice]) -> str:
    gains = [c.speedup for c in choices if c.speedup is not None]
    if not gains:
        return f" ({choices[0].how})"
    low, high = min(gains), max(gains)
    return f" ({low:.2f}×)" if abs(high - low) < 0.005 else f" ({low:.2f}–{high:.2f}×)"
