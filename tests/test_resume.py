"""Crash safety, end to end: SIGKILL then `--resume auto` continues exactly; Ctrl-C saves."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train_helpers import one_thread_env, write_dataset

MAX_STEPS = 40


def pretrain_cmd(data, out, *extra):
    return [sys.executable, "-m", "ling", "pretrain", "--data", str(data), "--out", str(out),
            "--model.name", "tiny", "--model.context-length", "32", "--model.dropout", "0.1",
            "--train.precision", "fp32", "--train.max-steps", str(MAX_STEPS), "--train.batch-tokens", "1024",
            "--train.micro-batch", "16", "--train.warmup-steps", "5", "--train.eval-every", "10",
            "--train.eval-batches", "2", "--train.log-every", "1", *extra]


def records(run):
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["kind"] in ("train", "eval")]  # the curves, not the kernels record


def curve(run):
    return {(r["kind"], r["step"]): r.get("loss", r.get("val_loss")) for r in records(run)}


def wait_for_step(proc, run, step):
    """Block until the run has logged `step` (watching metrics.jsonl, not the clock)."""
    while proc.poll() is None:
        try:
            if any(r["kind"] == "train" and r["step"] >= step for r in records(run)):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.002)
    pytest.fail(f"the run ended (status {proc.returncode}) before step {step}:\n{proc.stderr.read()}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny")


def test_sigkill_at_an_arbitrary_step_then_resume_gives_exactly_the_uninterrupted_losses(data, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(pretrain_cmd(data, reference), check=True, capture_output=True, env=one_thread_env())

    run = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(data, run), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=one_thread_env())
    wait_for_step(proc, run, 23)  # past the checkpoints of steps 10 and 20
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = max(r["step"] for r in records(run))
    assert killed_at < MAX_STEPS

    resumed = subprocess.run(pretrain_cmd(data, run, "--resume", "auto"), capture_output=True, text=True,
                             env=one_thread_env())
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-20'}" in resumed.stderr
    expected = curve(reference)
    assert len(expected) == MAX_STEPS + MAX_STEPS // 10
    assert curve(run) == expected  # every train and val loss, bit for bit


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(pretrain_cmd(data, run), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=one_thread_env())
    wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    step = max(r["step"] for r in records(run))
    assert step < MAX_STEPS
    assert os.readlink(run / "latest") == f"checkpoints/step-{step}"
    hint = err.rsplit("resume with: ", 1)[1].split()
    assert hint[:2] == ["ling", "pretrain"] and hint[-2:] == ["--resume", "auto"]
    resumed = subprocess.run([sys.executable, "-m", "ling", *hint[1:]], capture_output=True, text=True,
                             env=one_thread_env())
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'checkpoints' / f'step-{step}'}" in resumed.stderr
    assert max(r["step"] for r in records(run)) == MAX_STEPS
