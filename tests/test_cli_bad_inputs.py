"""Every bad input the hardening probe found is one `error:` line and a non-zero exit — never a
traceback, never a lost or half-written output. In-process `ling.cli.main` calls (fast); the
run-directory lock across processes is tested in test_train_hardening."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from ling import cli
from ling.checkpoint import load_checkpoint
from ling.data import prepare as prepare_module
from tests.train_helpers import write_dataset

TINY = ["--model.name", "tiny", "--model.context-length", "16", "--train.batch-tokens", "256",
        "--train.micro-batch", "16", "--train.precision", "fp32", "--train.eval-batches", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A finished two-step run: its checkpoints are copied and damaged by the tests."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["pretrain", "--data", str(data), "--out", str(run), *TINY, "--train.max-steps", "2",
                     "--train.eval-every", "1", "--train.warmup-steps", "0", "--train.lr", "0.01"]) == 0
    return run


def one_error_line(capsys, argv) -> str:
    """Run `ling ARGV`; it must fail with exactly one line on stderr after any warnings."""
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line
             and not line.startswith(("warning: ", "model: "))]  # progress bars, warnings, the model line
    assert status == 1, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("flags, expected", [
    (["--train.beta1", "2"], "train.beta1 must be in [0, 1) (AdamW's moving-average factor), got 2.0"),
    (["--train.beta2", "-0.5"], "train.beta2 must be in [0, 1) (AdamW's moving-average factor), got -0.5"),
    (["--model.dropout", "1.5"], "model.dropout must be in [0, 1), got 1.5"),
    (["--model.dropout", "-0.1"], "model.dropout must be in [0, 1), got -0.1"),
    (["--model.init-std", "-1"], "model.init_std must be a finite number >= 0 (0.02 is usual), got -1.0"),
    (["--train.lr", "inf"], "train.lr must be a finite number, got inf"),
    (["--train.lr", "nan"], "train.lr must be a finite number, got nan"),
    (["--train.weight-decay", "-1"], "train.weight_decay, train.max_bad_steps and train.sample_tokens cannot be"),
    (["--model.norm-eps", "-1"], "model.norm_eps must be a small positive number (1e-5 is usual), got -1.0"),
    (["--model.rope-theta", "0"], "model.rope_theta must be at least 1 (the RoPE base; 10000 is usual), got 0.0"),
    (["--model.context-length", "1000000000000", "--train.batch-tokens", "16000000000000"],
     "model.context_length 1,000,000,000,000 is more than ling supports (16,777,216): its position tables "
     "alone would allocate 64.0 TB"),
])
def test_hyper_parameters_that_would_fail_or_train_to_nan(capsys, tmp_path, data, flags, expected):
    line = one_error_line(capsys, ["pretrain", "--data", data, "--out", tmp_path / "run", *TINY, *flags])
    assert line == "error: " + expected or line.startswith("error: " + expected)
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_binary_or_a_directory(capsys, tmp_path, data):
    binary = tmp_path / "c.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    assert one_error_line(capsys, ["pretrain", "--config", binary, "--data", data, "--out", tmp_path / "r"]) == \
        f"error: {binary}: not a YAML config file (not UTF-8 text)"
    assert one_error_line(capsys, ["pretrain", "--config", tmp_path, "--data", data, "--out", tmp_path / "r"]) == \
        f"error: {tmp_path}: is a directory, not a YAML config file"


@pytest.mark.parametrize("kind", ["dangling", "loop", "file"])
def test_an_out_that_cannot_be_a_run_directory(capsys, tmp_path, data, kind):
    out = tmp_path / "out"
    if kind == "dangling":
        out.symlink_to(tmp_path / "nowhere")
        expected = (f"error: {out}: a symlink to {tmp_path / 'nowhere'}, which does not exist; "
                    "remove it or choose another --out")
    elif kind == "loop":
        out.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(out)
        expected = f"error: {out}: a symlink loop; remove it or choose another --out"
    else:
        out.write_text("my notes")
        expected = f"error: {out}: exists and is not a directory; choose another --out"
    assert one_error_line(capsys, ["pretrain", "--data", data, "--out", out, *TINY]) == expected
    assert not (tmp_path / "nowhere").exists()
    if kind == "file":
        assert out.read_text() == "my notes"


def test_a_real_directory_named_latest(capsys, tmp_path, data):
    (tmp_path / "run" / "latest").mkdir(parents=True)
    (tmp_path / "run" / "latest" / "mine.txt").write_text("mine")
    line = one_error_line(capsys, ["pretrain", "--data", data, "--out", tmp_path / "run", *TINY, "--resume", "auto"])
    assert line == (f"error: {tmp_path / 'run' / 'latest'} is a directory, not ling's pointer to a checkpoint "
                    "(a symlink): move it away, or choose another --out")
    assert (tmp_path / "run" / "latest" / "mine.txt").read_text() == "mine"


def test_a_malicious_pickle_in_train_state_is_refused_in_one_line(capsys, tmp_path, data, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = run / "checkpoints" / "step-2" / "train_state.pt"
    state.write_bytes(pickle.dumps(Payload()))
    line = one_error_line(capsys, ["pretrain", "--data", data, "--out", tmp_path / "new", *TINY,
                                   "--train.max-steps", "4", "--resume", state.parent])
    assert line.startswith(f"error: {state}: unreadable (it holds more than tensors and plain values, "
                           "so it was not unpickled: Unsupported")
    assert not marker.exists()
    # --resume auto: the damaged checkpoint is neither resumed nor overwritten; its weights are offered.
    line = one_error_line(capsys, ["pretrain", "--data", data, "--out", run, *TINY, "--train.max-steps", "4",
                                   "--resume", "auto"])
    assert line == (f"error: {state.parent} is not a checkpoint ling can resume or replace, and this run would "
                    f"overwrite it at step 2: move it out of {run / 'checkpoints'}, or start a new run from its intact "
                    f"weights: ling pretrain --config {run / 'config.yaml'} --init-from {state.parent} --out NEW_DIR")
    assert not marker.exists()


def test_the_offered_init_from_command_starts_from_those_weights(capsys, tmp_path, data, trained):
    step = trained / "checkpoints" / "step-2"
    status = cli.main(["pretrain", "--config", str(trained / "config.yaml"), "--init-from", str(step),
                       "--out", str(tmp_path / "new"), "--train.max-steps", "1", "--train.lr", "1e-6",
                       "--train.min-lr", "0"])
    assert status == 0, capsys.readouterr().err
    # One step at lr 1e-6 from step-2's weights stays within 1e-4 of them; a fresh init is ~0.01 away from them
    # (two steps at lr 0.01).
    start, after = load_checkpoint(step)[0].state_dict(), load_checkpoint(tmp_path / "new" / "latest")[0].state_dict()
    for name, tensor in start.items():
        torch.testing.assert_close(after[name], tensor, atol=1e-4, rtol=0)


def checkpoint_copy(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "checkpoints" / "step-2", ckpt)
    return ckpt


def test_a_config_json_of_random_bytes(capsys, tmp_path, trained):
    ckpt = checkpoint_copy(trained, tmp_path)
    (ckpt / "config.json").write_bytes(bytes(range(255, 0, -1)))
    line = one_error_line(capsys, ["generate", ckpt, "--prompt", "hi"])
    assert line == f"error: {ckpt / 'config.json'}: not UTF-8 text"


def test_a_tokenizer_config_that_is_a_list(capsys, tmp_path, trained):
    ckpt = checkpoint_copy(trained, tmp_path)
    (ckpt / "tokenizer_config.json").write_text("[1, 2]")
    assert one_error_line(capsys, ["generate", ckpt, "--prompt", "hi"]) == \
        f"error: {ckpt / 'tokenizer_config.json'}: expected a JSON object of tokenizer settings, got a list"


@pytest.mark.parametrize("value", [10**12, 1e12])
def test_a_context_length_of_1e12_says_what_it_would_allocate(capsys, tmp_path, trained, value):
    ckpt = checkpoint_copy(trained, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "context_length": value}))
    line = one_error_line(capsys, ["generate", ckpt, "--prompt", "hi"])
    # 1e12 is a whole number however it is written (issue 15): the same range check answers
    assert line.endswith("is more than ling supports (16,777,216): its position tables alone would allocate "
                         "64.0 TB")


def test_two_prepare_runs_into_one_output(capsys, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("the first run's text\n")
    (tmp_path / "b.txt").write_text("the second run's text\n")
    argv = ["prepare", "--output", str(tmp_path / "ds"), "--tokenizer", "char"]
    meta = prepare_module._meta

    def another_run_finishes_first(*args, **kwargs):  # while this run writes, another completes
        monkeypatch.setattr(prepare_module, "_meta", meta)
        assert cli.main([*argv, "--input", str(tmp_path / "b.txt")]) == 0
        return meta(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_meta", another_run_finishes_first)
    line = one_error_line(capsys, [*argv, "--input", tmp_path / "a.txt"])
    assert line == (f"error: {tmp_path / 'ds'} appeared while this run was writing it (another run?): "
                    "left it as it is, and discarded this run's output")
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["sources"][0]["name"].endswith("b.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "ds"]


def test_body_timeout_must_be_positive(capsys, tmp_path, trained):
    assert one_error_line(capsys, ["serve", trained / "latest", "--body-timeout", "0", "--port", "0"]) == \
        "error: --body-timeout must be a positive number of seconds, got 0.0"


def test_overwrite_replaces_only_an_artifact_of_the_same_kind(capsys, tmp_path, trained):
    ckpt = trained / "checkpoints" / "step-2"
    hf, ling_ckpt = tmp_path / "hf", tmp_path / "ling"
    assert cli.main(["convert", "to-hf", str(ckpt), str(hf)]) == 0
    assert cli.main(["convert", "to-hf", str(ckpt), str(hf), "--overwrite"]) == 0  # ling's own export
    assert cli.main(["convert", "from-hf", str(hf), str(ling_ckpt)]) == 0
    capsys.readouterr()
    assert one_error_line(capsys, ["convert", "to-hf", ckpt, ling_ckpt, "--overwrite"]) == (
        f"error: {ling_ckpt} does not hold a Hugging Face export ling wrote, so --overwrite does not replace it: "
        "move it away or choose another path")
    assert one_error_line(capsys, ["convert", "from-hf", hf, hf, "--overwrite"]).startswith(
        f"error: {hf} does not hold a checkpoint ling wrote")
    assert sorted(p.name for p in ling_ckpt.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
