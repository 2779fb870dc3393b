"""The Optuna side of a sweep: the study in its storage, the sampler and pruner, and trials.

A trial is a normal run of the command, in this process, by the one trainer: the trainer
calls back after each evaluation (`Trainer.after_eval`), the value goes to `trial.report`, and
when `trial.should_prune()` says so the run stops there (its checkpoint of that step is kept).
Whatever ends a trial — completion, pruning, an error — is told to the study with the reason
as the trial's `reason` attribute, and the next trial starts; only Ctrl-C stops the sweep.

Optuna's RDB storage is the only shared state: worker processes on this machine and `ling
sweep` processes elsewhere that open the same storage and study name share the study.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout

from ling.dataclass_io import to_dict
from ling.errors import LingError
from ling.sweep.spec import Plan, command_parts

INTERRUPTED = "interrupted"
"""the `reason` prefix of a trial stopped by Ctrl-C: not counted, so a rerun runs it again"""


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise LingError("ling sweep needs Optuna, an optional extra: pip install -e '.[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def make_sampler(plan: Plan, worker: int = 0):
    optuna = import_optuna()
    args = plan.args
    seed = None if args.seed is None else args.seed + worker  # workers must not draw the same values
    if args.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if args.sampler == "grid":
        return optuna.samplers.GridSampler({d.key: d.grid() for d in plan.dims}, seed=seed)
    # Optuna's default of 10 random trials first would be most of a short study.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, args.trials // 3)))


def make_pruner(plan: Plan, train_cfg):
    optuna = import_optuna()
    if plan.args.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, plan.args.trials // 4)))
    if plan.args.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min(train_cfg.eval_every, train_cfg.max_steps),
                                              max_resource=train_cfg.max_steps, reduction_factor=3)
    return optuna.pruners.NopPruner()


def space_signature(plan: Plan) -> str:
    return json.dumps({"command": plan.args.command, "metric": plan.args.metric,
                       "space": [to_dict(d) for d in plan.dims]}, sort_keys=True)


def open_study(plan: Plan, worker: int = 0):
    """The study in its storage, created on first use; a study created for another space,
    metric or direction is refused (a new `out` or `study` name starts a new one)."""
    optuna = import_optuna()
    try:
        storage = optuna.storages.RDBStorage(plan.storage)
    except Exception as e:  # a bad URL, a missing driver, a server that does not answer
        raise LingError(f"storage {plan.storage}: cannot be opened ({_first_line(e)})") from None
    train_cfg = plan.trial_args({}, plan.out / "trials" / "check").train
    try:
        study = optuna.create_study(storage=storage, study_name=plan.study_name, direction=plan.args.direction,
                                    sampler=make_sampler(plan, worker), pruner=make_pruner(plan, train_cfg),
                                    load_if_exists=True)
    except Exception as e:
        raise LingError(f"storage {plan.storage}: cannot open the study '{plan.study_name}' ({_first_line(e)})") from None
    signature = space_signature(plan)
    stored = study.user_attrs.get("ling_space")
    if stored is None:
        study.set_user_attr("ling_space", signature)
    elif stored != signature or study.direction.name.lower() != plan.args.direction:
        raise LingError(f"the study '{plan.study_name}' in {plan.storage} was made for another command, space, metric "
                        "or direction: choose a new out (or study name) for this sweep")
    return study


def counted(study) -> int:
    """Trials that are done: complete, pruned or failed — not those stopped by Ctrl-C or whose
    process ended (a failed trial without a reason), which a rerun runs again."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and "reason" in t.user_attrs
                   and not str(t.user_attrs["reason"]).startswith(INTERRUPTED)))


def reason(trial) -> str:
    """Why a trial did not complete ('' when it did)."""
    if trial.state.name == "FAIL" and "reason" not in trial.user_attrs:
        return f"{INTERRUPTED}: its process ended"
    return str(trial.user_attrs.get("reason", ""))


def fail_stale(study) -> int:
    """Mark trials left RUNNING by a process that ended (killed, machine reset) as failed; only
    for a storage no other process uses (the caller holds the sweep directory's lock)."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
    return len(stale)


def run_trial(plan: Plan, study) -> tuple[int, str]:
    """Ask the study for values, train one run with them, tell the study how it ended.
    Returns (trial number, state: complete | pruned | fail | interrupted)."""
    optuna = import_optuna()
    trial = study.ask()
    metric, maximize = plan.args.metric, plan.args.direction == "maximize"
    run_dir = plan.out / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("dir", str(run_dir))
    values = {d.key: d.suggest(trial) for d in plan.dims}
    seen: list[tuple[int, float]] = []

    def after_eval(record: dict) -> None:
        value = record.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        seen.append((record["step"], float(value)))
        trial.report(float(value), record["step"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {record['step']}: {metric} {value:.4g}")

    _, run = command_parts(plan.args.command)
    t0 = time.perf_counter()
    state, reason, steps = "fail", None, None
    try:
        args = plan.trial_args(values, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "sweep.log", "w", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
            try:
                result = run(args, show_summary=False, after_eval=after_eval)
            except (optuna.TrialPruned, LingError, KeyboardInterrupt):
                raise
            except Exception:
                traceback.print_exc()  # into the trial's log; the table shows one line
                raise
        result = result[0] if isinstance(result, tuple) else result
        steps = result.step
        if result.interrupted:
            state, reason = INTERRUPTED, f"{INTERRUPTED} at step {result.step}"
        elif not seen:
            reason = f"the run finished without reporting {metric}"
        else:
            state = "complete"
    except optuna.TrialPruned as e:
        state, reason = "pruned", str(e)
    except KeyboardInterrupt:
        state, reason = INTERRUPTED, INTERRUPTED
    except LingError as e:
        reason = str(e)
    except Exception as e:
        reason = f"{_first_line(e)} (traceback in {run_dir / 'sweep.log'})"
    if steps is None:
        steps = seen[-1][0] if seen else 0
    trial.set_user_attr("steps", steps)
    trial.set_user_attr("seconds", time.perf_counter() - t0)
    if reason is not None:
        trial.set_user_attr("reason", reason)
    if state == "complete":
        best = (max if maximize else min)(v for _, v in seen)
        trial.set_user_attr("final", seen[-1][1])
        study.tell(trial, best)
    else:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if state == "pruned" else optuna.trial.TrialState.FAIL)
    if state == INTERRUPTED and reason == INTERRUPTED:
        raise KeyboardInterrupt
    return trial.number, state


def work(plan: Plan, quota: int, target: int, worker: int = 0, on_done=None) -> bool:
    """Run up to `quota` trials while the study holds fewer than `target` done ones.
    Returns True when Ctrl-C stopped it."""
    study = open_study(plan, worker)
    for _ in range(quota):
        if counted(study) >= target:  # other processes sharing the storage filled the study
            break
        number, state = run_trial(plan, study)
        if on_done is not None:
            on_done(study, number)
        if state == INTERRUPTED:
            return True
    return False


def worker_main(argv: list[str]) -> int:
    """`python -m ling.sweep.worker PLAN_JSON WORKER QUOTA TARGET THREADS`: one worker process."""
    import torch

    from ling.dataclass_io import from_dict
    from ling.sweep.spec import SweepArgs, check

    spec, worker, quota, target, threads = json.loads(argv[0]), *map(int, argv[1:5])
    torch.set_num_threads(threads)
    try:
        plan = check(from_dict(SweepArgs, spec, where="sweep worker"))
        return 130 if work(plan, quota, target, worker) else 0
    except LingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
