"""Sharded data parallel (FSDP2, gloo on CPU, real torchrun subprocesses): N processes train the
model one process trains, resume exactly, reshard 2 → 1 → 2, meet through a c10d rendezvous,
shard a LoRA run, and save weights every command opens."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from ling import cli
from ling.checkpoint import load_checkpoint, save_model_dir
from ling.config import ModelConfig
from ling.data.synthetic import make_examples, write_jsonl
from ling.model import build_model
from ling.tokenizer import Tokenizer
from tests.train_helpers import one_thread_env, write_dataset

MAX_STEPS = 20
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!+0123456789\n"
LAUNCH = [sys.executable, "-m", "torch.distributed.run"]


def pretrain_args(data, out, *extra):
    return ["pretrain", "--data", str(data), "--out", str(out), "--model.name", "tiny",
            "--model.context-length", "32", "--train.precision", "fp32", "--train.max-steps", str(MAX_STEPS),
            "--train.batch-tokens", "1024", "--train.micro-batch", "16", "--train.warmup-steps", "2",
            "--train.eval-every", "5", "--train.eval-batches", "3", "--train.log-every", "1",
            "--kernels", "reference", *extra]


def torchrun(processes, args, **popen):
    """`torchrun --standalone --nproc-per-node N -m ling ARGS --train.parallel fsdp`."""
    cmd = LAUNCH + ["--standalone", "--nproc-per-node", str(processes), "-m", "ling", *args, "--train.parallel", "fsdp"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=one_thread_env(), start_new_session=True, **popen)


def finish(proc):
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return err


def records(run):
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["kind"] in ("train", "eval")]


def curve(run):
    return {(r["kind"], r["step"]): r.get("loss", r.get("val_loss")) for r in records(run)}


def assert_close_curves(got: dict, expected: dict):
    assert got.keys() <= expected.keys() and got
    for key, value in got.items():  # fp32 sums in another order: a few ulps per step
        assert value == pytest.approx(expected[key], rel=1e-5), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (no FSDP) and two FSDP processes, the same global batch, run side by side."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_dataset(root / "data")
    one = subprocess.Popen([sys.executable, "-m", "ling", *pretrain_args(data, root / "one")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=one_thread_env())
    two = torchrun(2, pretrain_args(data, root / "two"))
    finish(one), finish(two)
    return {"root": root, "data": data, "one": root / "one", "two": root / "two"}


@pytest.mark.slow
def test_two_fsdp_processes_train_the_model_of_one_and_save_plain_weights(runs, capsys):
    one, two = curve(runs["one"]), curve(runs["two"])
    assert len(one) == MAX_STEPS + MAX_STEPS // 5 and one.keys() == two.keys()
    assert_close_curves(two, one)
    latest = runs["two"] / "latest"
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt", "train_state.dcp"} <= {
        p.name for p in latest.iterdir()}
    assert {p.name for p in (latest / "train_state.dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    # the gathered weights are a plain checkpoint (no DTensors, no prefixes) with one process's weights
    m1, _ = load_checkpoint(runs["one"] / "latest")
    m2, _ = load_checkpoint(latest)
    assert m2.state_dict().keys() == m1.state_dict().keys()
    for (name, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
    assert cli.main(["generate", str(latest), "--prompt", "The king", "--max-new-tokens", "8",
                     "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The king")


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


@pytest.mark.slow
def test_sigkill_then_resume_gives_exactly_the_uninterrupted_losses(runs, tmp_path):
    run = tmp_path / "killed"
    proc = torchrun(2, pretrain_args(runs["data"], run))
    wait_for_step(proc, run, 13)  # past the checkpoint of step 10
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, at once
    proc.wait()
    assert max(r["step"] for r in records(run)) < MAX_STEPS
    err = finish(torchrun(2, pretrain_args(runs["data"], run, "--resume", "auto")))
    assert "resumed from" in err
    assert curve(run) == curve(runs["two"])  # every train and val loss, bit for bit


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(runs, tmp_path):
    one = curve(runs["one"])
    # 2 → 1: the two-process checkpoint of step 10, resharded onto one process
    finish(torchrun(1, pretrain_args(runs["data"], tmp_path / "r1", "--resume",
                                     str(runs["two"] / "checkpoints" / "step-10"))))
    assert_close_curves(curve(tmp_path / "r1"), one)
    assert min(step for _, step in curve(tmp_path / "r1")) == 11
    # 1 → 2: that one-process run's checkpoint of step 15, onto two
    assert {p.name for p in (tmp_path / "r1" / "checkpoints" / "step-15" / "train_state.dcp").iterdir()} == {
        ".metadata", "__0_0.distcp"}
    finish(torchrun(2, pretrain_args(runs["data"], tmp_path / "r2", "--resume",
                                     str(tmp_path / "r1" / "checkpoints" / "step-15"))))
    assert_close_curves(curve(tmp_path / "r2"), one)
    # and without FSDP: one plain process continues a sharded checkpoint (weights from
    # model.safetensors, the optimizer state through DCP)
    subprocess.run([sys.executable, "-m", "ling", *pretrain_args(runs["data"], tmp_path / "plain", "--resume",
                                                                 str(runs["two"] / "checkpoints" / "step-15"))],
                   check=True, capture_output=True, env=one_thread_env())
    assert_close_curves(curve(tmp_path / "plain"), one)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_meet_through_a_c10d_rendezvous(runs, tmp_path):
    """Two "machines" of one process each on localhost: what the multi-node recipe runs."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(LAUNCH + ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                        "--rdzv-endpoint", endpoint, "--rdzv-id", "ling-test", "-m", "ling",
                                        *pretrain_args(runs["data"], tmp_path / "run"), "--train.parallel", "fsdp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=one_thread_env())
             for _ in range(2)]
    for node in nodes:
        finish(node)
    assert curve(tmp_path / "run") == curve(runs["two"])  # two nodes of one process = one node of two


@pytest.mark.slow
def test_lora_and_activation_checkpointing_under_fsdp_train_the_adapters_of_one_process(runs, tmp_path):
    base = tmp_path / "base"  # a tiny random-init base with a char tokenizer, as the fine-tuning tests use
    tok = Tokenizer.train_char([ALPHABET])
    torch.manual_seed(0)
    save_model_dir(build_model(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, context_length=64)), tok, base)
    write_jsonl(make_examples("sort", 80), tmp_path / "sort.jsonl", "alpaca")
    args = lambda out: ["finetune", "--base", str(base), "--data", str(tmp_path / "sort.jsonl"), "--out", str(out),
                        "--method", "lora", "--lora.rank", "4", "--lora.dropout", "0", "--max-seq-len", "64",
                        "--samples", "1", "--sample-tokens", "4", "--device", "cpu", "--kernels", "reference",
                        "--train.precision", "fp32", "--train.max-steps", "4", "--train.batch-tokens", "1024",
                        "--train.micro-batch", "8", "--train.eval-every", "2", "--train.eval-batches", "2",
                        "--train.log-every", "1", "--train.warmup-steps", "1", "--train.lr", "3e-3"]
    one = subprocess.Popen([sys.executable, "-m", "ling", *args(tmp_path / "one")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=one_thread_env())
    two = torchrun(2, args(tmp_path / "two") + ["--train.activation-checkpointing"])  # recomputed: the same values
    finish(one), finish(two)
    assert_close_curves(curve(tmp_path / "two"), curve(tmp_path / "one"))
    latest = tmp_path / "two" / "latest"
    assert {"adapter.json", "adapter.safetensors", "train_state.dcp"} <= {p.name for p in latest.iterdir()}
    assert not (latest / "model.safetensors").exists()  # the frozen base is not copied
    merged, _ = load_checkpoint(latest)
    reference, _ = load_checkpoint(tmp_path / "one" / "latest")
    for (name, p), q in zip(reference.state_dict().items(), merged.state_dict().values()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
    samples = (tmp_path / "two" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in samples] == [2, 4]  # answered on rank 0 alone, from the gathered model


def test_fsdp_without_torchrun_says_how_to_launch_it(tmp_path, capsys, monkeypatch):
    data = write_dataset(tmp_path / "data")
    capsys.readouterr()
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    argv = pretrain_args(data, tmp_path / "run", "--train.parallel", "fsdp")
    monkeypatch.setattr(sys, "argv", ["ling", *argv])
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: --train.parallel fsdp shards the model across processes started by torchrun: "
                             f"torchrun --nproc-per-node N -m ling pretrain --data {data} ")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_whole_checkpoint_under_fsdp_is_one_line_saying_why_not(runs, tmp_path):
    proc = torchrun(1, pretrain_args(runs["data"], tmp_path / "run", "--resume",
                                     str(runs["one"] / "checkpoints" / "step-10")))
    _, err = proc.communicate()
    assert proc.returncode != 0
    assert (f"error: {runs['one'] / 'checkpoints' / 'step-10'} was saved without FSDP, which keeps the whole "
            "optimizer state in train_state.pt") in err
