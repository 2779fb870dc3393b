"""`ling sweep`: a study of real (tiny) pretraining runs — best.yaml, resume, pruning, failed
trials, parallel workers — and the errors a user can make, each as the command line it is."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ling import cli
from tests.train_helpers import one_thread_env, write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny")


def sweep_config(path: Path, data: Path, out: Path, **over) -> Path:
    config = {
        "command": "pretrain",
        "out": str(out),
        "base": {"data": str(data), "device": "cpu", "kernels": "reference",
                 "model": {"name": "tiny", "context_length": 16},
                 "train": {"max_steps": 4, "batch_tokens": 256, "micro_batch": 16, "precision": "fp32",
                           "min_lr": 0.0, "warmup_steps": 0, "eval_every": 2, "eval_batches": 1, "log_every": 2}},
        "space": {"train.lr": {"float": [1.0e-3, 3.0e-2], "log": True}, "train.warmup-steps": {"int": [0, 2]}},
        "trials": 2, "sampler": "random", "pruner": "none", "seed": 0,
        **over,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def read_csv(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def last_eval(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"][-1]


@pytest.fixture(scope="module")
def study(data, tmp_path_factory):
    """A finished 2-trial study (in this process, as `ling sweep --config FILE` runs it)."""
    work = tmp_path_factory.mktemp("sweep")
    config = sweep_config(work / "sweep.yaml", data, work / "out")
    assert cli.main(["sweep", "--config", str(config)]) == 0
    return work / "out", config


def test_a_study_of_normal_runs_and_a_best_yaml_that_pretrain_runs_as_is(study, capsys):
    out, _ = study
    rows = read_csv(out)
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "complete"), ("1", "complete")]
    for r in rows:  # each trial is a run directory; its score is the best val loss it reported
        run = out / "trials" / f"{int(r['trial']):04d}"
        assert (run / "config.yaml").exists() and (run / "latest").exists()
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == float(r["train.lr"])
        evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
        assert float(r["val_loss"]) == min(e["val_loss"] for e in evals) and int(r["steps"]) == 4
    best = min(rows, key=lambda r: float(r["val_loss"]))
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert config["train"]["lr"] == float(best["train.lr"])
    assert config["train"]["warmup_steps"] == int(best["train.warmup_steps"])
    assert config["out"] == str(out / "best")
    for name in ("optimization_history.png", "parallel_coordinate.png", "param_importances.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert cli.main(["pretrain", "--config", str(out / "best.yaml")]) == 0
    torch.testing.assert_close(torch.tensor(last_eval(out / "best")["val_loss"]), torch.tensor(float(best["val_loss"])))


def test_running_again_continues_the_study(study, tmp_path, capsys):
    source, _ = study
    out = tmp_path / "out"
    shutil.copytree(source, out)
    before = read_csv(out)
    config = sweep_config(tmp_path / "sweep.yaml", Path(yaml.safe_load(study[1].read_text())["base"]["data"]), out)
    assert cli.main(["sweep", "--config", str(config), "--trials", "3"]) == 0
    rows = read_csv(out)
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and rows[2]["state"] == "complete"
    assert [(r["train.lr"], r["val_loss"]) for r in rows[:2]] == [(r["train.lr"], r["val_loss"]) for r in before]
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0002"]
    assert "3 trials (2 done)" in capsys.readouterr().out
    assert cli.main(["sweep", "--config", str(config), "--trials", "3"]) == 0  # nothing left to run
    assert len(read_csv(out)) == 3


def test_pruned_and_failed_trials_are_recorded_and_the_study_goes_on(data, tmp_path):
    # Random sampler, seed 4, draws lr = 1e6, 0.02, 0.02, 1e-7: the first diverges (a failed
    # trial), two complete, and the median pruner (2 complete trials first) stops the last at
    # its first evaluation, worse than the median there.
    out = tmp_path / "out"
    config = sweep_config(tmp_path / "sweep.yaml", data, out, trials=4, seed=4, pruner="median",
                          space={"train.lr": {"choice": [0.02, 1.0e-7, 1.0e6]}})
    assert cli.main(["sweep", "--config", str(config)]) == 0
    rows = read_csv(out)
    assert [(float(r["train.lr"]), r["state"]) for r in rows] == [
        (1e6, "fail"), (0.02, "complete"), (0.02, "complete"), (1e-7, "pruned")]
    assert "loss" in rows[0]["reason"] and "step" in rows[0]["reason"]
    assert rows[3]["reason"].startswith("pruned at step 2: val_loss") and rows[3]["steps"] == "2"
    assert (out / "trials" / "0003" / "checkpoints" / "step-2").is_dir()  # the pruned run keeps its checkpoint
    assert yaml.safe_load((out / "best.yaml").read_text())["train"]["lr"] == 0.02


def test_two_workers_share_the_study(data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    config = sweep_config(tmp_path / "sweep.yaml", data, out, workers=2)
    assert cli.main(["sweep", "--config", str(config)]) == 0
    rows = read_csv(out)
    assert sorted(r["trial"] for r in rows) == ["0", "1"] and {r["state"] for r in rows} == {"complete"}
    assert sorted(p.name for p in (out / "workers").iterdir()) == ["worker-0.log", "worker-1.log"]
    assert len({r["train.lr"] for r in rows}) == 2  # the workers' samplers draw different values


def ling_sweep(tmp_path: Path, data: Path, *extra: str, **over) -> subprocess.CompletedProcess:
    config = sweep_config(tmp_path / "sweep.yaml", data, tmp_path / "out", **over)
    return subprocess.run([sys.executable, "-m", "ling", "sweep", "--config", str(config), *extra], cwd=ROOT,
                          capture_output=True, text=True, env=one_thread_env(), timeout=120)


BAD = {
    "unknown key": ({"space": {"train.lrr": {"float": [1e-4, 1e-2]}}},
                    "error: unknown key 'train.lrr' in space; did you mean 'train.lr'?"),
    "inverted range": ({"space": {"train.lr": {"float": [1e-2, 1e-4]}}},
                       "error: space.train.lr: the range [0.01, 0.0001] is inverted"),
    "empty range": ({"space": {"train.warmup_steps": {"int": [3, 3]}}},
                    "error: space.train.warmup_steps: the range [3, 3] is empty"),
    "metric": ({"metric": "accuracy"},
               "error: metric 'accuracy' is never reported by ling pretrain (its evaluation reports: val_loss)"),
    "storage": ({"storage": "nosuchdb://host/db"}, "error: storage nosuchdb://host/db: cannot be opened"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_before_any_trial(case, data, tmp_path):
    over, message = BAD[case]
    result = ling_sweep(tmp_path, data, **over)
    assert result.returncode == 1 and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_without_optuna_it_prints_the_install_command(data, tmp_path):
    config = sweep_config(tmp_path / "sweep.yaml", data, tmp_path / "out")
    code = "import sys; sys.modules['optuna'] = None; from ling.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "sweep", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, env=one_thread_env(), timeout=120)
    assert result.returncode == 1 and "pip install -e '.[sweep]'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_base_as_files_and_mappings_applied_in_order(data, tmp_path):
    from ling.sweep.spec import SweepArgs, check

    recipe = ROOT / "configs" / "shakespeare-char-cpu.yaml"
    plan = check(SweepArgs(out=str(tmp_path / "out"), base=[str(recipe), {"data": str(data), "train": {"lr": 0.01}}],
                           space={"model.n-embd": {"choice": [64, 96]}}))
    args = plan.trial_args({"model.n_embd": 96}, tmp_path / "run")
    assert (args.data, args.out, args.train.lr, args.train.max_steps) == (str(data), str(tmp_path / "run"), 0.01, 2000)
    # the recipe's n_head (4) stays, head_dim is derived again from the new width
    assert (args.model.n_embd, args.model.n_head, args.model.head_dim, args.model.mlp_hidden) == (96, 4, 24, 352)
    assert not (tmp_path / "out").exists()


def test_the_shipped_sweep_config_passes_every_check(data, tmp_path, monkeypatch):
    """configs/sweep-shakespeare-char.yaml (the README's sweep), on a stand-in for the dataset it names."""
    from ling.sweep.spec import SweepArgs, check

    config = yaml.safe_load((ROOT / "configs" / "sweep-shakespeare-char.yaml").read_text())
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "shakespeare-char-cpu.yaml", tmp_path / "configs")
    (tmp_path / "data").mkdir()
    shutil.copytree(data, tmp_path / "data" / "shakespeare-char")
    monkeypatch.chdir(tmp_path)
    plan = check(SweepArgs(**config))
    assert [d.key for d in plan.dims] == ["train.lr", "train.warmup_steps", "train.weight_decay"]
    assert plan.args.trials == 16 and not (tmp_path / "runs").exists()


def test_finetune_metrics_are_named_and_every_sampler_and_pruner_builds(data, tmp_path):
    from ling.errors import LingError
    from ling.sweep.spec import SweepArgs, check
    from ling.sweep.study import make_pruner, make_sampler

    base = {"base": "models/any", "data": "train.jsonl"}
    with pytest.raises(LingError, match=r"metric 'exact_match' is never reported by ling finetune --task sft "
                                        r"\(its evaluation reports: val_loss, sample_exact_match\); did you mean "
                                        r"'sample_exact_match'\?"):
        check(SweepArgs(command="finetune", out=str(tmp_path / "o"), base=base, metric="exact_match",
                        space={"lora.rank": {"choice": [4, 8]}}))
    plan = check(SweepArgs(command="finetune", out=str(tmp_path / "o"), base={**base, "task": "classification"},
                           metric="val_accuracy", direction="maximize", sampler="grid",
                           space={"lora.rank": {"choice": [4, 8]}, "train.warmup_steps": {"int": [0, 2]}}))
    assert [d.grid() for d in plan.dims] == [[4, 8], [0, 1, 2]]
    train = plan.trial_args({}, tmp_path / "run").train
    for sampler in ("tpe", "random", "grid"):
        for pruner in ("median", "hyperband", "none"):
            plan.args.sampler, plan.args.pruner = sampler, pruner
            assert make_sampler(plan) is not None and make_pruner(plan, train) is not None
    with pytest.raises(LingError, match=r"space.train.lr: the grid sampler needs listed values"):
        check(SweepArgs(out=str(tmp_path / "o"), base={"data": str(data)}, sampler="grid",
                        space={"train.lr": {"float": [1e-4, 1e-2]}}))
    assert not (tmp_path / "o").exists()
