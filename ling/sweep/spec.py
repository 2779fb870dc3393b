"""What a sweep searches: the `ling sweep` config, its search space, and each trial's config.

Everything here is checked before the first trial runs: a key of `space` must be one of the
command's own config keys (the closest is named otherwise), a range must be non-empty and in
order, every value a range can take must make a valid config, and the metric must be one the
command's evaluation reports. A trial's config is the base config with the trial's values put
in, built by the same machinery as `--config FILE` (`ling.config_files`), so `best.yaml` runs
as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import tyro

from ling.config_files import config_from_mapping, yaml_mapping
from ling.dataclass_io import closest, unknown_key_message
from ling.errors import LingError

COMMANDS = {
    "pretrain": "ling.train.pretrain:PretrainArgs:run_pretraining",
    "finetune": "ling.train.finetune:FinetuneArgs:run_finetune",
}
"""the commands a sweep can run: where their config class and their run function live"""

MANAGED = ("out", "resume")
"""config keys the sweep sets itself (each trial's run directory, always fresh)"""


@dataclass
class SweepArgs:
    """Search a training command's hyper-parameters with Optuna; every trial is a normal run."""

    command: Literal["pretrain", "finetune"] = "pretrain"
    """the command each trial runs"""
    out: str = "runs/sweep"
    """sweep directory: trials/NNNN/ (one run directory per trial), study.db, best.yaml, trials.csv, *.png"""
    base: Annotated[Any, tyro.conf.arg(metavar="PATH", constructor=str)] = None
    """the command's config the trials start from: a YAML path, the config inline as a mapping, or a list
    of them applied in order (e.g. [configs/recipe.yaml, {data: DIR}])"""
    space: Annotated[dict, tyro.conf.Suppress] = field(default_factory=dict)
    """(YAML only) KEY: {float: [LOW, HIGH]} | {int: [LOW, HIGH]} | {choice: [A, B, ...]}, optionally with
    log: true (float, int) or step: N; KEY is one of the command's config keys, e.g. train.lr"""
    trials: int = 20
    """trials the study holds when done (complete, pruned or failed; a rerun runs only the missing ones)"""
    metric: str = "val_loss"
    """what a trial is scored by: a metric the command's evaluation reports (the best value of the trial)"""
    direction: Literal["minimize", "maximize"] = "minimize"
    pruner: Literal["median", "hyperband", "none"] = "median"
    """stop a trial early when its metric at an evaluation is worse than the other trials' there"""
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    """how the next values are chosen; grid needs every key as choice or int"""
    storage: Optional[str] = None
    """Optuna storage URL (default sqlite:///OUT/study.db); an RDB URL such as PostgreSQL shares one
    study between `ling sweep` processes on several machines"""
    workers: int = 1
    """trials run at once on this machine, each in its own process (the CPU threads split between them)"""
    seed: Optional[int] = None
    """the sampler's seed (None = random)"""
    study: Optional[str] = None
    """the study's name in the storage (default: the name of OUT)"""


@dataclass(frozen=True)
class Dimension:
    """One key of the search space."""

    key: str
    """the command's config key, dotted, with underscores (train.warmup_steps)"""
    kind: Literal["float", "int", "choice"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def extremes(self) -> list:
        """The values that, with the rest of the base config, must each make a valid config."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def grid(self) -> list:
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(self.low, self.high + 1, self.step or 1))
        raise LingError(f"space.{self.key}: the grid sampler needs listed values: write it as {{choice: [...]}}"
                        + ("" if self.kind == "float" else " (or drop log: true)"))


def command_parts(command: str):
    """The command's config class and its run function (`run(args, show_summary, after_eval)`)."""
    module, cls, fn = COMMANDS[command].split(":")
    module = importlib.import_module(module)
    return getattr(module, cls), getattr(module, fn)


def config_keys(cls, prefix: str = "") -> list[str]:
    """Every settable key of a config class, dotted (model.n_layer, train.lr, lora.rank, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or (not prefix and f.name in MANAGED):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _number(value, kind: str, where: str):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        ok = ok and float(value).is_integer()
    if not ok:
        raise LingError(f"{where}: expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    return int(value) if kind == "int" else float(value)


def parse_dimension(key: str, spec: Any, valid: list[str]) -> Dimension:
    norm = key.replace("-", "_")
    if norm not in valid:
        hint = closest(norm, valid)
        if hint is None:
            raise LingError(unknown_key_message(norm, valid, "space"))
        raise LingError(f"unknown key '{key}' in space; did you mean '{hint}'?")
    where = f"space.{key}"
    form = "{float: [LOW, HIGH]}, {int: [LOW, HIGH]} or {choice: [A, B, ...]}"
    if not isinstance(spec, dict):
        raise LingError(f"{where}: expected a mapping such as {form}, got {spec!r}")
    kinds = [k for k in ("float", "int", "choice") if k in spec]
    for option in spec:
        if option not in ("float", "int", "choice", "log", "step"):
            hint = closest(str(option), ["float", "int", "choice", "log", "step"])
            raise LingError(f"{where}: unknown option '{option}'" + (f"; did you mean '{hint}'?" if hint else "")
                            + f" (expected {form}, with optional log: true or step: N)")
    if len(kinds) != 1:
        raise LingError(f"{where}: give exactly one of {form}")
    kind = kinds[0]
    values = spec[kind]
    if kind == "choice":
        if not isinstance(values, list) or len(values) < 2:
            raise LingError(f"{where}: choice needs a list of at least two values, got {values!r}")
        if "log" in spec or "step" in spec:
            raise LingError(f"{where}: log and step apply to float and int ranges, not to choice")
        return Dimension(norm, "choice", choices=tuple(values))
    if not isinstance(values, list) or len(values) != 2:
        raise LingError(f"{where}: {kind} needs [LOW, HIGH], got {values!r}")
    low, high = (_number(v, kind, where) for v in values)
    if low > high:
        raise LingError(f"{where}: the range [{low}, {high}] is inverted: LOW must be below HIGH")
    if low == high:
        raise LingError(f"{where}: the range [{low}, {high}] is empty; for a fixed value set it in base instead")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise LingError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise LingError(f"{where}: log: true needs LOW > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, kind, f"{where}.step")
        if step <= 0 or log:
            raise LingError(f"{where}: step must be positive and cannot go with log: true")
    return Dimension(norm, kind, low, high, log, step)


def parse_space(space: dict, cls) -> list[Dimension]:
    if not isinstance(space, dict) or not space:
        raise LingError("space is empty: give at least one key to search, e.g. train.lr: {float: [1.0e-4, 1.0e-2], "
                        "log: true}")
    valid = config_keys(cls)
    dims = [parse_dimension(str(key), spec, valid) for key, spec in space.items()]
    seen = set()
    for d in dims:
        if d.key in seen:
            raise LingError(f"space: '{d.key}' is given twice")
        seen.add(d.key)
    return dims


def _merge(into: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def base_mapping(base: Any) -> tuple[dict, str]:
    """The base config as one mapping, and where it came from (for error messages). A list of
    paths and mappings is applied in order, as repeated `--config` files are."""
    if base is None:
        raise LingError("base is missing: give the command's config, a YAML path or an inline mapping")
    parts = base if isinstance(base, list) else [base]
    merged, where = {}, []
    for part in parts:
        if isinstance(part, (str, Path)):
            _merge(merged, yaml_mapping(str(part)))
            where.append(str(part))
        elif isinstance(part, dict):
            _merge(merged, part)
            where.append("base")
        else:
            raise LingError(f"base must be a YAML path, a mapping or a list of them, got {part!r}")
    return merged, " + ".join(dict.fromkeys(where))


def with_values(mapping: dict, values: dict[str, Any], out: str) -> dict:
    """A copy of `mapping` with each dotted key set to its value and `out` set."""
    result = {k: v for k, v in copy.deepcopy(mapping).items() if k not in MANAGED}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    result["out"] = out
    return result


def reported_metrics(command: str, args) -> list[str]:
    """The metrics the command's evaluation writes on its metrics.jsonl eval lines."""
    if command == "pretrain":
        return ["val_loss"]
    if args.task == "classification":
        return ["val_loss", "val_accuracy"]
    return ["val_loss"] + (["sample_exact_match"] if args.samples > 0 else [])


@dataclass
class Plan:
    """A checked sweep: everything a trial needs, picklable for worker processes."""

    args: SweepArgs
    dims: list[Dimension]
    base: dict
    where: str
    out: Path
    storage: str
    study_name: str

    def trial_args(self, values: dict[str, Any], out: str | Path):
        cls, _ = command_parts(self.args.command)
        data = with_values(self.base, values, str(out))
        try:
            return config_from_mapping(cls, data, where=self.where)
        except LingError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise LingError(f"{e} (with {shown})" if values else str(e)) from None


def check(args: SweepArgs) -> Plan:
    """Every check that can be made before a trial runs; the resolved plan."""
    if args.trials <= 0:
        raise LingError(f"trials must be positive, got {args.trials}")
    if args.workers <= 0:
        raise LingError(f"workers must be positive, got {args.workers}")
    cls, _ = command_parts(args.command)
    base, where = base_mapping(args.base)
    dims = parse_space(args.space, cls)
    out = Path(args.out)
    plan = Plan(args, dims, base, where, out,
                storage=args.storage or f"sqlite:///{(out / 'study.db').resolve()}",
                study_name=args.study or out.resolve().name)
    probe = out / "trials" / "check"
    try:
        first = plan.trial_args({}, probe)
    except LingError as e:
        if "no value for the required" not in str(e):
            raise
        raise LingError(f"{e}: give them in base, e.g. base: [{where.split(' + ')[0]}, {{data: DIR}}]") from None
    for d in dims:
        for value in d.extremes():
            try:
                plan.trial_args({d.key: value}, probe)
            except LingError as e:
                raise LingError(f"space.{d.key}: the value {value!r} makes an invalid ling {args.command} config: "
                                f"{str(e).split(' (with ')[0]}") from None
    metrics = reported_metrics(args.command, first)
    if args.metric not in metrics:
        hint = closest(args.metric, metrics) or next((m for m in metrics if args.metric in m), None)
        raise LingError(f"metric '{args.metric}' is never reported by ling {args.command}"
                        + (f" --task {first.task}" if args.command == "finetune" else "")
                        + f" (its evaluation reports: {', '.join(metrics)})"
                        + (f"; did you mean '{hint}'?" if hint else ""))
    if args.sampler == "grid":
        for d in dims:
            d.grid()
    return plan
