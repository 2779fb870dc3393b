"""`ling eval CKPT --tasks A,B`: standard benchmarks through lm-evaluation-harness.

The tasks are lm_eval's (its registered ones, which fetch their data from the Hugging Face
Hub) or the user's own task YAML files in `--tasks-dir`, which may read local json, jsonl or
csv files (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`): that is how to
evaluate offline. The model is ling's own (`ling.eval.harness.LingLM`), never a conversion
to transformers. Results: lm_eval's table, its results JSON (`--out`) and, with
`--log-samples`, every scored sample (one JSONL file per task beside the results).
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path

from ling.atomic import atomic_file
from ling.errors import LingError
from ling.train.heads import is_classifier_dir

INSTALL = "lm-eval tasks need the lm_eval package: pip install -e '.[eval]'"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LingError(INSTALL) from None
    import lm_eval.evaluator
    import lm_eval.tasks
    import lm_eval.utils

    return lm_eval


def _known(manager, name: str) -> bool:
    return name in manager.all_tasks or bool(manager.match_tasks([name])) or Path(name).is_file()


def _task_manager(lm_eval, names: list[str], tasks_dir: str | None):
    """lm_eval's task index: of --tasks-dir alone when it holds every task asked for (indexing
    lm_eval's own thousands of task files takes seconds), else of both."""
    if tasks_dir is not None:
        local = lm_eval.tasks.TaskManager(include_path=tasks_dir, include_defaults=False)
        if all(_known(local, name) for name in names):
            return local
    manager = lm_eval.tasks.TaskManager(include_path=tasks_dir)
    for name in names:
        if not _known(manager, name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            where = f" (nor in --tasks-dir {tasks_dir})" if tasks_dir else ""
            hint = f"; closest: {', '.join(close)}" if close else "; see 'lm_eval ls tasks' for the names"
            raise LingError(f"--tasks: unknown task '{name}'{where}{hint}")
    return manager


def _is_offline_error(error: BaseException) -> bool:
    """Whether a failure to build a task is its dataset not being reachable on the Hub."""
    text = f"{type(error).__name__}: {error}".lower()
    markers = ("offline", "connection", "couldn't reach", "could not reach", "hub", "resolve", "timed out",
               "max retries", "name or service not known", "temporary failure in name resolution")
    return any(m in text for m in markers)


def _load(manager, names: list[str], tasks_dir: str | None) -> list:
    """Build the tasks (reading or downloading their data): the top-level tasks and groups."""
    try:
        loaded = manager.load(names)
    except Exception as e:
        if _is_offline_error(e):
            raise LingError(f"--tasks {','.join(names)}: a task's dataset is on the Hugging Face Hub, which cannot be "
                            f"reached ({type(e).__name__}); to evaluate offline, write a task YAML over local "
                            "json/jsonl/csv files and pass its folder with --tasks-dir DIR (see docs/eval.md)"
                            ) from None
        where = f" (a task YAML in {tasks_dir}?)" if tasks_dir else ""
        raise LingError(f"--tasks {','.join(names)}: cannot build the task{where}: {type(e).__name__}: {e}") from None
    groups = loaded.get("groups", {})
    children = {c for kids in loaded.get("group_map", {}).values() for c in kids}
    members = {t.task_name for g in groups.values() for t in g.get_all_tasks()}
    return ([g for name, g in groups.items() if name not in children]
            + [t for name, t in loaded["tasks"].items() if name not in members])


def _write_samples(out: Path, samples: dict) -> list[Path]:
    import lm_eval.utils

    written = []
    for task, rows in samples.items():
        path = out.with_name(f"{out.stem}_samples_{task}.jsonl")
        with atomic_file(path) as f:
            for row in rows:
                f.write(json.dumps(row, default=lm_eval.utils.handle_non_serializable, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def run_tasks(args) -> dict:
    """Evaluate `args.checkpoint` on `args.tasks` (an `EvalArgs`); the lm_eval results dict."""
    if args.log_samples and not args.out:
        raise LingError("--log-samples writes the samples beside the results: give --out results.json too")
    if args.tasks_dir is not None and not Path(args.tasks_dir).is_dir():
        raise LingError(f"--tasks-dir {args.tasks_dir}: no such directory")
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise LingError("--tasks: give at least one task name (e.g. --tasks hellaswag,arc_easy)")
    if not Path(args.checkpoint).exists():
        raise LingError(f"{args.checkpoint}: no such checkpoint directory or .gguf file")
    if is_classifier_dir(args.checkpoint):
        raise LingError(f"{args.checkpoint}: a classifier (task head) checkpoint; lm-eval tasks need a language model")
    lm_eval = _lm_eval()
    from ling.eval.harness import LingLM

    for noisy in ("lm_eval", "lm-eval"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    manager = _task_manager(lm_eval, names, args.tasks_dir)
    tasks = _load(manager, names, args.tasks_dir)  # before the model: a task that cannot be built fails fast
    lm = LingLM(args.checkpoint, batch_size=args.batch_size, device=args.device,
                dtype=args.precision, max_length=args.max_seq_len)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = lm_eval.evaluator.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit, task_manager=manager,
        log_samples=args.log_samples, bootstrap_iters=args.bootstrap_iters)
    samples = results.pop("samples", None)
    print(lm_eval.utils.make_table(results))
    if "groups" in results:
        print(lm_eval.utils.make_table(results, "groups"))
    n_requests = sum(v.get("effective", v.get("original", 0)) for v in results.get("n-samples", {}).values())
    truncated = ", ".join(f"{n} {kind} request(s)" for kind, n in lm.truncated.items() if n) or "none"
    print(f"{len(results['results'])} task(s), {n_requests} documents; contexts truncated on the left to fit "
          f"the {lm.max_length}-token window: {truncated}")
    if args.out:
        out = Path(args.out)
        with atomic_file(out) as f:
            f.write(json.dumps(results, indent=2, default=lm_eval.utils.handle_non_serializable, ensure_ascii=False)
                    + "\n")
        written = _write_samples(out, samples) if args.log_samples and samples else []
        print(f"results: {out}" + "".join(f"\nsamples: {p}" for p in written))
    return results
