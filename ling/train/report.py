"""What a run leaves to read: `metrics.jsonl`, TensorBoard events, and `report.png`.

`metrics.jsonl` has one JSON object per line: `{"kind": "train", "step", "loss", "lr",
"tokens", "tokens_per_s", "mfu", ...}` every log step and `{"kind": "eval", "step",
"val_loss", ...}` every evaluation (with what the objective reports besides, e.g. preference
tuning's `rewards/*`, which report.png then plots too); every record also carries `time` (when
it was written, Unix seconds) and `elapsed` (seconds of training since the run began, resumed
sessions added up). On resume, lines after the checkpoint's step (written by the run that was
interrupted) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ling.atomic import atomic_file


class MetricsLog:
    """Appends records to metrics.jsonl (and TensorBoard if installed); draws report.png."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.report_path = Path(run_dir) / "report.png"
        self.enabled = enabled
        self.records: list[dict] = []
        self._started, self._elapsed_before = time.perf_counter(), 0.0
        self._tb = _tensorboard_writer(Path(run_dir) / "tensorboard") if enabled else None

    def resume_at(self, step: int) -> None:
        """Keep the records up to `step` (those the checkpoint being resumed has seen)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(record)
        with atomic_file(self.path) as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.records = kept

    def start(self, step: int = 0) -> None:
        """Training begins (or resumes at `step`): `elapsed` counts from now, on top of the
        time the kept records of earlier sessions reached."""
        self._started = time.perf_counter()
        self._elapsed_before = max((r.get("elapsed", 0.0) for r in self.records if r.get("step", 0) <= step),
                                   default=0.0)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3),
                  "elapsed": round(self._elapsed_before + time.perf_counter() - self._started, 3)}
        self.records.append(record)
        # O_NOFOLLOW: a symlink planted at metrics.jsonl is an error, not a way to write elsewhere.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if key not in ("kind", "step", "time", "elapsed") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
            self._tb.flush()

    def plot(self) -> None:
        """report.png: train/val loss, throughput and learning rate against the step."""
        if not self.enabled:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [r for r in self.records if r.get("kind") == "train"]
        evals = [r for r in self.records if r.get("kind") == "eval" and r.get("val_loss") is not None]
        rewards = any("rewards/margins" in r for r in train + evals)
        fig = Figure(figsize=(16 if rewards else 12, 3.6), layout="constrained")
        axes = fig.subplots(1, 4 if rewards else 3)
        loss_ax, speed_ax, lr_ax = axes[:3]
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
        loss_ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val", ms=3)
        if evals:
            best = min(evals, key=lambda r: r["val_loss"])
            loss_ax.set_title(f"loss (best val {best['val_loss']:.4f} at step {best['step']})")
        else:
            loss_ax.set_title("loss")
        loss_ax.legend()
        speed_ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], lw=1)
        speed_ax.set_title("throughput (tokens/s)")
        speed_ax.set_ylim(bottom=0)
        lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], lw=1)
        lr_ax.set_title("learning rate")
        if rewards:
            _plot_rewards(axes[3], train, evals)
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        with atomic_file(self.report_path, "wb") as f:
            FigureCanvasAgg(fig).print_png(f)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plot_rewards(ax, train: list[dict], evals: list[dict]) -> None:
    """Preference rewards (trl's names): chosen, rejected and their margin, train lines and
    val markers; the reward accuracy on the right axis."""
    for name, color in (("chosen", "C2"), ("rejected", "C3"), ("margins", "C0")):
        key = f"rewards/{name}"
        ax.plot(*_series(train, key), color=color, lw=1, label=name)
        ax.plot(*_series(evals, key), "o", color=color, ms=3)
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(loc="upper left", fontsize="small")
    accuracy = ax.twinx()
    key = "rewards/accuracies"
    accuracy.plot(*_series(train, key), color="C1", lw=1, alpha=0.6)
    accuracy.plot(*_series(evals, key), "s-", color="C1", ms=3)
    accuracy.set_ylim(0, 1.05)
    accuracy.set_ylabel("reward accuracy (orange; squares = val)")
    last = next((r for r in reversed(evals) if key in r), None)
    ax.set_title("rewards" + (f" (val accuracy {last[key]:.0%} at step {last['step']})" if last else ""))


def _series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that have `key`."""
    kept = [r for r in records if key in r]
    return [r["step"] for r in kept], [r[key] for r in kept]


def _tensorboard_writer(log_dir: Path):
    """A SummaryWriter when `tensorboard` is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))
