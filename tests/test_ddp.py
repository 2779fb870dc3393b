"""Data parallel: 2 processes (torchrun, gloo on CPU) train the model 1 process trains."""

import json
import subprocess
import sys

import pytest
import torch

from ling.checkpoint import load_checkpoint
from tests.train_helpers import one_thread_env, write_dataset


def train(data, out, processes):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    cmd = (launcher if processes > 1 else [sys.executable]) + [
        "-m", "ling", "pretrain", "--data", str(data), "--out", str(out), "--model.name", "tiny",
        "--model.context-length", "32", "--train.precision", "fp32", "--train.max-steps", "6",
        "--train.batch-tokens", "1024", "--train.micro-batch", "16", "--train.warmup-steps", "2",
        "--train.eval-every", "3", "--train.eval-batches", "3", "--train.log-every", "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=one_thread_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["kind"] in ("train", "eval")]  # the curves, not the kernels record


@pytest.mark.slow
def test_two_processes_give_the_loss_curve_of_one_with_the_same_global_batch(tmp_path):
    data = write_dataset(tmp_path / "data")
    one = train(data, tmp_path / "one", 1)  # 2 accumulation steps of 16 sequences
    two = train(data, tmp_path / "two", 2)  # 1 step of 16 sequences in each process
    assert [(r["kind"], r["step"]) for r in two] == [(r["kind"], r["step"]) for r in one]
    for a, b in zip(one, two):
        key = "loss" if a["kind"] == "train" else "val_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5), a["step"]
    assert two[-1]["tokens"] == one[-1]["tokens"] == 6 * 1024
    # rank 0 wrote a plain checkpoint (no DDP prefixes) with the same weights
    m1, _ = load_checkpoint(tmp_path / "one" / "latest")
    m2, _ = load_checkpoint(tmp_path / "two" / "latest")
    for (name, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
