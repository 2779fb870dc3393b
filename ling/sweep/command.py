"""`ling sweep --config sweep.yaml`: run a study of `trials` trials, then write its outputs.

Everything is checked first (`ling.sweep.spec.check`); then the trials the study still lacks
run — in this process with `workers: 1`, else in N worker processes sharing the study's
storage, the CPU threads split between them — while a table shows each finished trial. A
rerun of the same command continues the study: `trials` is the size of the study when done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from ling.dataclass_io import to_dict
from ling.errors import LingError
from ling.sweep import outputs
from ling.sweep.spec import Plan, SweepArgs, check
from ling.sweep.study import counted, fail_stale, import_optuna, open_study, work


@contextmanager
def _sweep_lock(out: Path):
    """One `ling sweep` at a time per sweep directory (workers are its children)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".sweep.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LingError(f"{out}: another ling sweep is running on it; run trials in parallel with workers: N, "
                            "or from other machines through a shared storage URL") from None
        yield


def _target(plan: Plan) -> int:
    if plan.args.sampler != "grid":
        return plan.args.trials
    size = 1
    for d in plan.dims:
        size *= len(d.grid())
    return min(plan.args.trials, size)


def _run_workers(plan: Plan, remaining: int, target: int, show) -> bool:
    """`remaining` trials over `workers` processes; `show(study)` runs about every second.
    Returns True when Ctrl-C stopped them."""
    n = min(plan.args.workers, remaining)
    threads = max(1, (os.cpu_count() or 1) // n)
    quotas = [remaining // n + (i < remaining % n) for i in range(n)]
    spec = to_dict(plan.args)
    spec.update(base=plan.base, storage=plan.storage, study=plan.study_name, out=str(plan.out))
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    logs = plan.out / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, quota in enumerate(quotas):
        with open(logs / f"worker-{i}.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "ling.sweep.worker", json.dumps(spec), str(i), str(quota), str(target),
                 str(threads)], env=env, stdout=log, stderr=subprocess.STDOUT))
    study = open_study(plan)
    interrupted = False
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1)
            show(study)
    except KeyboardInterrupt:  # the workers got the same SIGINT: they save and stop
        interrupted = True
        for p in procs:
            p.wait()
    show(study)
    for i, p in enumerate(procs):
        if p.returncode == 130:
            interrupted = True
        elif p.returncode != 0:
            lines = (logs / f"worker-{i}.log").read_text(errors="replace").strip().splitlines()
            tqdm.write(f"warning: worker {i} exited with status {p.returncode}: "
                       f"{lines[-1] if lines else 'no output'} ({logs / f'worker-{i}.log'})", file=sys.stderr)
    return interrupted


def sweep(args: SweepArgs) -> int:
    import_optuna()
    plan = check(args)
    t0 = time.perf_counter()
    own_storage = args.storage is None
    if not own_storage:
        open_study(plan)  # a storage that cannot be opened is one line, before OUT is made
    with _sweep_lock(plan.out):
        study = open_study(plan)
        stale = fail_stale(study) if own_storage else 0
        target = _target(plan)
        done = counted(study)
        table = outputs.Table(plan)
        print(f"sweep: ling {args.command} · {target} trials ({done} done) · sampler {args.sampler} · "
              f"pruner {args.pruner} · {args.metric} ({args.direction}) · {args.workers} worker(s)\n"
              f"study: '{plan.study_name}' in {plan.storage}"
              + (f" · {stale} trial(s) left running by an ended process marked failed" if stale else ""))
        if target < args.trials:
            print(f"note: the grid has {target} points, so the study stops there")
        train = plan.trial_args({}, plan.out / "trials" / "check").train
        if args.pruner != "none" and train.eval_every >= train.max_steps:
            print("note: each trial evaluates only at its end (train.eval_every ≥ train.max_steps), so the pruner "
                  "has nothing to stop early; lower train.eval_every in base")
        print(table.header())
        before = {t.number for t in outputs.finished(study)}
        shown = set()
        bar = tqdm(total=target, initial=min(done, target), desc="trials", unit="trial", dynamic_ncols=True,
                   file=sys.stderr)

        def show(study) -> None:
            for t in outputs.finished(study):
                if t.number not in shown:
                    shown.add(t.number)
                    bar.update(t.number not in before)
                    tqdm.write(table.row(t), file=sys.stdout)

        show(study)
        remaining = target - done
        interrupted = False
        try:
            if remaining > 0 and args.workers == 1:
                interrupted = work(plan, remaining, target, on_done=lambda s, _: show(s))
            elif remaining > 0:
                interrupted = _run_workers(plan, remaining, target, show)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
        study = open_study(plan)
        best = outputs.best_trial(study)
        best_path = outputs.write_best(plan, best) if best is not None else None
        outputs.write_csv(plan, study)
        plots, skipped = outputs.write_plots(plan, study)
        print(outputs.summary(plan, study, time.perf_counter() - t0, best_path, plots, skipped))
    if interrupted:
        print(f"interrupted: run the same command again to continue the study ({counted(study)} of {target} done)",
              file=sys.stderr)
        return 130
    return 0
