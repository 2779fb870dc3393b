"""The newcomer's path (issue 15): what the README and the quickstart tell a new user to do
next works — a run's own config.yaml runs again, the shipped recipes export, Ctrl-C saves at
once, YAML numbers as people write them, re-runs keep earlier runs, a quiet and exact command
line, and runs that explain themselves."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ling import cli
from ling.checkpoint import save_model_dir
from ling.config import ModelConfig
from ling.data.synthetic import make_examples, write_jsonl
from ling.hf.checkpoint import export_family
from ling.model import build_model
from ling.quickstart import MODEL, plan_steps
from ling.tokenizer import Tokenizer
from tests.train_helpers import one_thread_env, write_dataset

LING = [sys.executable, "-m", "ling"]
TINY = ["--model.name", "tiny", "--model.context-length", "16", "--train.batch-tokens", "256",
        "--train.micro-batch", "16", "--train.precision", "fp32", "--train.warmup-steps", "1",
        "--train.eval-batches", "2", "--train.log-every", "1", "--device", "cpu"]


def ling(*args, **kwargs) -> subprocess.CompletedProcess:
    """`ling ARGS` in a subprocess (output redirected, as to a file), under the usual umask."""
    return subprocess.run([*LING, *map(str, args)], capture_output=True, text=True, env=one_thread_env(),
                          preexec_fn=lambda: os.umask(0o022), **kwargs)


def records(run, kind=None):
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if kind is None or r["kind"] == kind]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """A 4-step pretraining run, then its own config.yaml given back for 2 steps more."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    started = time.time()
    first = ling("pretrain", "--data", data, "--out", run, *TINY, "--train.max-steps", 4, "--train.eval-every", 2)
    assert first.returncode == 0, first.stderr
    second = ling("pretrain", "--config", run / "config.yaml", "--train.max-steps", 6, "--resume", "auto")
    return run, first, second, started, time.time()


@pytest.fixture(scope="module")
def quickstarts(tmp_path_factory):
    """`ling quickstart` twice into the same --out, with a tiny budget."""
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    args = ("quickstart", "--minutes", 0.01, "--out", out, "--sample-tokens", 8, "--device", "cpu")
    first = ling(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "run" / "summary.json").read_text())  # before a test trains it on
    second = ling(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, first, second, summary


# ---- 1. a run's own config.yaml runs again ---------------------------------------------------
def test_a_pretraining_runs_config_yaml_continues_it(pretrained):
    run, _, second, _, _ = pretrained
    assert second.returncode == 0, second.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-4'}" in second.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.slow  # two quickstarts (the module's fixture)
def test_the_quickstarts_train_on_command_continues_its_run(quickstarts):
    out, first, _, summary = quickstarts
    command = next(line for line in first.stdout.splitlines() if "# train on" in line).split("#")[0].split()
    assert command[:3] == ["ling", "pretrain", "--config"] and command[-2:] == ["--resume", "auto"]
    assert yaml.safe_load((out / "run" / "config.yaml").read_text())["model"]["name"] == "custom"
    steps = summary["steps"] + 2  # a couple of steps past the run
    command[command.index("--train.max-steps") + 1] = str(steps)
    resumed = ling(*command[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'run' / 'checkpoints' / 'step-{}'.format(summary['steps'])}" in resumed.stderr
    assert json.loads((out / "run" / "summary.json").read_text())["steps"] == steps


def test_a_finetuning_runs_config_yaml_continues_it(tmp_path):
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!+0123456789\n"
    tok = Tokenizer.train_char([alphabet])
    save_model_dir(build_model(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, context_length=64)), tok,
                   tmp_path / "base")
    write_jsonl(make_examples("reverse", 40), tmp_path / "rev.jsonl", "messages")
    run = tmp_path / "ft"
    first = ling("finetune", "--base", tmp_path / "base", "--data", tmp_path / "rev.jsonl", "--out", run,
                 "--max-seq-len", 64, "--samples", 0, "--device", "cpu", "--train.precision", "fp32",
                 "--train.max-steps", 2, "--train.batch-tokens", 512, "--train.micro-batch", 8,
                 "--train.eval-every", 2, "--train.eval-batches", 1, "--train.warmup-steps", 1)
    assert first.returncode == 0, first.stderr
    again = ling("finetune", "--config", run / "config.yaml", "--train.max-steps", 3, "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-2'}" in again.stderr
    # 11. the report's validation curve starts at the loss measured before training
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3
    evals = records(run, "eval")
    assert evals[0]["step"] == 0 and [r["step"] for r in evals].count(0) == 1
    assert evals[0]["val_loss"] == pytest.approx(summary["base_val_loss"], rel=1e-6)


# ---- 2. the shipped recipes train models that export ----------------------------------------
def test_the_shipped_recipe_and_the_quickstart_model_are_llama_shaped(capsys):
    assert cli.main(["pretrain", "--data", "d", "--out", "o", "--config", "configs/shakespeare-char-cpu.yaml",
                     "--print-config"]) == 0
    recipe = ModelConfig.from_dict(yaml.safe_load(capsys.readouterr().out)["model"])
    for cfg in (recipe, MODEL):
        assert (cfg.norm, cfg.mlp, cfg.position, cfg.bias) == ("rmsnorm", "swiglu", "rope", "none")
        assert export_family(cfg).architecture == "LlamaForCausalLM"


@pytest.mark.slow  # two quickstarts (the module's fixture)
def test_the_quickstarts_checkpoint_converts_to_hf(quickstarts, tmp_path):
    out = quickstarts[0]
    converted = ling("convert", "to-hf", out / "run" / "best", tmp_path / "hf")
    assert converted.returncode == 0, converted.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_pretrain_says_first_that_a_shape_will_not_export(data, tmp_path):
    proc = ling("pretrain", "--data", data, "--out", tmp_path / "run", *TINY, "--model.norm", "layernorm",
                "--train.max-steps", 1)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    note = next(i for i, line in enumerate(lines) if line.startswith("note: `ling convert to-hf`"))
    assert "needs norm='rmsnorm'" in lines[note]
    assert note < next(i for i, line in enumerate(lines) if line.startswith("model: "))


# ---- 6. Ctrl-C saves at once ----------------------------------------------------------------
def test_ctrl_c_saves_first_then_a_quick_validation(data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([*LING, "pretrain", "--data", str(data), "--out", str(run), *TINY,
                             "--train.max-steps", "100000", "--train.eval-every", "100000"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=one_thread_env())
    for line in proc.stderr:  # a line per log step: the run is training
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    assert proc.returncode == 130, err
    step = int(os.readlink(run / "latest").rsplit("-", 1)[1])
    assert 3 <= step < 100000
    assert f"step {step}: checkpoint saved; val loss " in out + err
    assert [r["step"] for r in records(run, "eval")] == [step]


def test_the_validation_after_ctrl_c_is_skipped_when_it_would_be_slow(data, tmp_path):
    from ling.data.dataset import open_dataset
    from ling.data.sampler import PretrainSampler, validation_batches
    from ling.train.config import TrainConfig
    from ling.train.trainer import Trainer

    tokens = open_dataset(data).val
    cfg = ModelConfig.from_name("tiny", context_length=16)
    trainer = Trainer(build_model(cfg), TrainConfig(precision="fp32", micro_batch=4, batch_tokens=64),
                      PretrainSampler(tokens, 16, 4, 1), validation_batches(tokens, 16, 4, 3), tmp_path / "run",
                      device=torch.device("cpu"), precision="fp32", flops_per_token=cfg.flops_per_token(),
                      kernels="reference")
    try:
        assert trainer.evaluate(budget_s=0.0) is None
        assert trainer.evaluate(budget_s=1e9) == trainer.evaluate()
    finally:
        trainer.run.close()


# ---- 7. YAML numbers as people write them ---------------------------------------------------
def test_yaml_and_flags_take_numbers_in_every_notation(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 3e-3\n  min_lr: 1E-4\n  max_steps: 1e3\n  warmup_steps: 1_0\n"
                      "  time_limit: 2\nmodel:\n  norm_eps: 1e-6\n  rope_theta: 5e5\n")
    assert cli.main(["pretrain", "--data", "d", "--out", "o", "--config", str(config), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    train, model = resolved["train"], resolved["model"]
    assert (train["lr"], train["min_lr"], train["max_steps"], train["warmup_steps"], train["time_limit"]) == \
        (0.003, 0.0001, 1000, 10, 2.0)
    assert (model["norm_eps"], model["rope_theta"]) == (1e-6, 500000.0)
    assert cli.main(["pretrain", "--data", "d", "--out", "o", "--train.max-steps", "2e3", "--train.lr", "5E-4",
                     "--print-config"]) == 0
    train = yaml.safe_load(capsys.readouterr().out)["train"]
    assert (train["max_steps"], train["lr"]) == (2000, 0.0005)


def test_a_fraction_is_still_no_step_count(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  max_steps: 2.5e2\n  warmup_steps: 1.5\n")
    assert cli.main(["pretrain", "--data", "d", "--out", "o", "--config", str(config)]) == 1
    assert "'train.warmup_steps'" in capsys.readouterr().err


# ---- 9. re-running the quickstart keeps the earlier run -------------------------------------
@pytest.mark.slow  # two quickstarts (the module's fixture)
def test_a_second_quickstart_keeps_the_first_run(quickstarts):
    out, first, second, _ = quickstarts
    assert f"earlier runs in {out} are kept: this one goes to {out / 'run-2'}" in second.stdout
    assert f"checkpoint: {out / 'run-2' / 'best'}" in second.stdout
    assert (out / "run" / "best" / "model.safetensors").exists()
    assert (out / "run-2" / "best" / "model.safetensors").exists()
    assert "earlier runs" not in first.stdout


# ---- 10. a quiet, exact command line --------------------------------------------------------
def test_bare_ling_prints_usage_and_exits_2_and_version():
    bare = ling()
    assert bare.returncode == 2 and bare.stderr.startswith("usage: ling COMMAND") and bare.stdout == ""
    version = ling("--version")
    assert version.returncode == 0 and version.stdout == "ling 0.1.0\n"


def test_help_has_no_subcommand_lists_and_whole_paragraphs():
    proc = subprocess.run([*LING, "pretrain", "--help"], capture_output=True, text=True,
                          env={**one_thread_env(), "COLUMNS": "80"})
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[0] == "usage: ling pretrain [-h] [OPTIONS]"
    assert "subcommand" not in proc.stdout and "rope-scaling:" not in proc.stdout
    # a docstring's line breaks are not the help's: the terminal's width wraps it (--resume's
    # docstring breaks after "there is"; 80 columns wrap that paragraph elsewhere)
    assert "start fresh if there is none); or the path of a checkpoint directory" in proc.stdout
    flat = " ".join(line.strip("│ ") for line in proc.stdout.splitlines())  # the boxes' text, as one line
    assert "--model.vocab-size INT tokens in the vocabulary (default: from the dataset's tokenizer)" in flat
    assert "--model.rope-scaling {None}|YAML" in proc.stdout


def test_a_typo_is_one_line_naming_the_commands_help():
    proc = ling("pretrain", "--data", "d", "--out", "o", "--train.lrr", "3")
    assert proc.returncode == 1
    assert proc.stderr == "error: unknown flag '--train.lrr'; did you mean '--train.lr'? (see 'ling pretrain --help')\n"


def test_an_optional_section_is_one_flag_taking_a_mapping(capsys):
    assert cli.main(["pretrain", "--data", "d", "--out", "o", "--model.rope_scaling",
                     "{factor: 4, original_context_length: 16}", "--print-config"]) == 0
    scaling = yaml.safe_load(capsys.readouterr().out)["model"]["rope_scaling"]
    assert scaling == {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}


# ---- 11. runs explain themselves ------------------------------------------------------------
def test_metrics_records_carry_the_time_and_the_training_seconds(pretrained):
    run, _, _, started, ended = pretrained
    rows = records(run)
    assert all(started <= r["time"] <= ended for r in rows)
    elapsed = [r["elapsed"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0  # the resumed session adds to the first one's


def test_pretrain_writes_summary_json(pretrained):
    run = pretrained[0]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["max_steps"], summary["tokens_seen"]) == (6, 6, 6 * 256)
    assert summary["checkpoint"] == str(run / "checkpoints" / "step-6")
    assert summary["final_val_loss"] == records(run, "eval")[-1]["val_loss"]
    assert (summary["interrupted"], summary["time_limited"]) == (False, False)


def test_redirected_output_has_a_line_per_log_step_and_no_bar_frames(pretrained):
    _, first, _, _, _ = pretrained
    steps = [line.split(" ·")[0] for line in first.stderr.splitlines() if line.startswith("step ")]
    assert steps == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert "\r" not in first.stderr and "it/s" not in first.stderr


def test_every_file_of_a_run_has_the_usual_mode(pretrained):
    run, _, _, _, _ = pretrained
    files = [p for p in run.rglob("*") if p.is_file() and not p.is_symlink() and "tensorboard" not in p.parts]
    assert run / "checkpoints" / "step-6" / "model.safetensors" in files
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in files} == {str(p): 0o644 for p in files}


def test_a_time_limit_that_ends_the_run_is_in_the_summary(data, tmp_path):
    run = tmp_path / "run"
    proc = ling("pretrain", "--data", data, "--out", run, *TINY, "--train.max-steps", 1000,
                "--train.time-limit", 1e-5)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time_limited"] and summary["steps"] < 1000


@pytest.mark.slow  # two quickstarts (the module's fixture)
def test_the_quickstart_says_when_its_budget_ended_training(quickstarts):
    _, first, _, summary = quickstarts
    message = f"stopped at step {summary['steps']} of {summary['max_steps']}: the 0.01-minute budget"
    assert (message in first.stdout) == summary["time_limited"]


def test_the_quickstart_plans_its_steps_around_its_evaluations():
    assert plan_steps(120, 0.1, 1.0) == int((120 - 6 * 1.0) / 0.1)
    assert plan_steps(1, 0.1, 1.0) == 20
