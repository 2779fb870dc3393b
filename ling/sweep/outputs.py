"""What a sweep leaves to read: the live table, `trials.csv`, `best.yaml`, the plots, a summary.

`best.yaml` is the base config with the best trial's values put in and `out` set to OUT/best,
so `ling pretrain --config OUT/best.yaml` (or `ling finetune`) trains that model as it is. The
plots are Optuna's own (`optuna.visualization.matplotlib`): the optimisation history, the
parallel coordinates of the values tried, and the importance of each key.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import yaml

from ling.atomic import atomic_file, atomic_path
from ling.sweep.spec import Plan, with_values
from ling.sweep.study import reason

PLOTS = {
    "optimization_history.png": "plot_optimization_history",
    "parallel_coordinate.png": "plot_parallel_coordinate",
    "param_importances.png": "plot_param_importances",
}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


class Table:
    """One line per finished trial: number, values, metric, state, steps, time, and why a
    trial stopped early."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.columns = ["trial", *[d.key for d in plan.dims], plan.args.metric, "state", "steps", "time"]
        self.widths = [max(len(c), 9) for c in self.columns]

    def header(self) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(self.columns, self.widths))

    def row(self, trial) -> str:
        value = trial.value if trial.value is not None else (
            trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
        seconds = trial.user_attrs.get("seconds")
        cells = [str(trial.number), *[_fmt(trial.params.get(d.key)) for d in self.plan.dims], _fmt(value),
                 trial.state.name.lower(), _fmt(trial.user_attrs.get("steps")),
                 f"{seconds:.0f} s" if seconds is not None else "-"]
        line = "  ".join(c.rjust(w) for c, w in zip(cells, self.widths))
        why = reason(trial)
        return line + (f"  {why}" if why and trial.state.name != "PRUNED" else "")


def finished(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def write_csv(plan: Plan, study) -> Path:
    path = plan.out / "trials.csv"
    keys = [d.key for d in plan.dims]
    with atomic_file(path) as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", plan.args.metric, *keys, "steps", "seconds", "reason", "dir"])
        for t in study.get_trials(deepcopy=False):
            writer.writerow([t.number, t.state.name.lower(), "" if t.value is None else t.value,
                             *[t.params.get(k, "") for k in keys], t.user_attrs.get("steps", ""),
                             "" if "seconds" not in t.user_attrs else round(t.user_attrs["seconds"], 2),
                             reason(t) if t.state.is_finished() else "", t.user_attrs.get("dir", "")])
    return path


def best_trial(study):
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return study.best_trial if complete else None


def write_best(plan: Plan, best) -> Path:
    path = plan.out / "best.yaml"
    config = with_values(plan.base, dict(best.params), str(plan.out / "best"))
    header = (f"# ling sweep: the best of the study '{plan.study_name}' — trial {best.number}, "
              f"{plan.args.metric} {best.value:.6g} ({best.user_attrs.get('dir', '')})\n"
              f"# run it: ling {plan.args.command} --config {path}\n")
    with atomic_file(path) as f:
        f.write(header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def write_plots(plan: Plan, study) -> tuple[list[Path], list[str]]:
    """The three PNG plots; those Optuna cannot draw yet (too few complete trials) are named
    with the reason instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written, skipped = [], []
    for name, fn in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(ovm, fn)(study, target_name=plan.args.metric)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            with atomic_path(plan.out / name) as tmp:
                fig.savefig(tmp, dpi=110, format="png")
            written.append(plan.out / name)
        except Exception as e:  # e.g. importances need two complete trials with different values
            skipped.append(f"{name} ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
        finally:
            plt.close("all")
    return written, skipped


def summary(plan: Plan, study, seconds: float, best_path: Path | None, plots: list[Path], skipped: list[str]) -> str:
    trials = finished(study)
    states = {s: sum(t.state.name.lower() == s for t in trials) for s in ("complete", "pruned", "fail")}
    steps = sum(int(t.user_attrs.get("steps", 0)) for t in trials)
    lines = [f"\ndone: {len(trials)} trials ({states['complete']} complete, {states['pruned']} pruned, "
             f"{states['fail']} failed) · {steps:,} training steps · {seconds:.0f} s this session"]
    best = best_trial(study)
    if best is None:
        lines.append("no trial completed: see the reasons above and each trial's sweep.log")
    else:
        values = " ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        lines.append(f"best: trial {best.number} · {plan.args.metric} {best.value:.4f} · {values}")
        lines.append(f"best config: {best_path}  (ling {plan.args.command} --config {best_path})")
    lines.append(f"trials: {plan.out / 'trials.csv'} · runs: {plan.out / 'trials'} · study: {plan.storage}")
    if plots:
        lines.append("plots: " + ", ".join(str(p) for p in plots))
    if skipped:
        lines.append("not plotted yet: " + "; ".join(skipped))
    return "\n".join(lines)
