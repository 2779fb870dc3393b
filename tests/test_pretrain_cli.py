"""`ling pretrain` flags, presets and the errors a user can make."""

import pytest
import yaml

from ling import cli
from ling.tokenizer import Tokenizer
from tests.train_helpers import write_dataset

TINY = ["--model.name", "tiny", "--model.context-length", "16", "--train.batch-tokens", "256",
        "--train.micro-batch", "16", "--train.precision", "fp32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny")


def run(capsys, *argv):
    status = cli.main(["pretrain", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def test_model_name_picks_a_preset_and_other_model_flags_override_it(capsys):
    status, out, _ = run(capsys, "--data", "d", "--out", "o", "--model.name", "gpt2", "--model.n-layer", "2",
                         "--print-config")
    model = yaml.safe_load(out)["model"]
    assert status == 0
    assert (model["name"], model["n_layer"], model["n_embd"], model["bias"]) == ("gpt2", 2, 768, "all")


def test_a_yaml_preset_with_overrides_and_flags_on_top(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: d\nout: o\nmodel:\n  name: llama-110m\n  n_layer: 3\ntrain:\n  lr: 0.01\n")
    status, out, _ = run(capsys, "--config", config, "--train.max-steps", "7", "--print-config")
    resolved = yaml.safe_load(out)
    assert status == 0
    assert (resolved["model"]["n_layer"], resolved["model"]["mlp"], resolved["model"]["n_kv_head"]) == (3, "swiglu", 4)
    assert (resolved["train"]["lr"], resolved["train"]["max_steps"]) == (0.01, 7)


def test_unknown_preset_names_the_closest(capsys):
    status, _, err = run(capsys, "--data", "d", "--out", "o", "--model.name", "shakespeare-chr")
    assert status == 1 and "unknown model preset 'shakespeare-chr'; did you mean 'shakespeare-char'?" in err


def test_unknown_config_key_names_the_closest(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  max_step: 10\n")
    status, _, err = run(capsys, "--config", config, "--data", "d", "--out", "o")
    assert status == 1 and "unknown key 'train.max_step'" in err and "did you mean 'train.max_steps'" in err


def test_missing_dataset_directory(capsys, tmp_path):
    status, _, err = run(capsys, "--data", tmp_path / "nope", "--out", tmp_path / "run", *TINY)
    assert status == 1 and "not a dataset directory" in err and "ling prepare" in err
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_that_does_not_match_the_data_is_refused(capsys, tmp_path, data):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (other / name).write_bytes((data / name).read_bytes())
    Tokenizer.train_char(["xyz"]).save(other)
    status, _, err = run(capsys, "--data", other, "--out", tmp_path / "run", *TINY)
    assert status == 1 and "tokenizer.json is not the tokenizer these ids were made with" in err


def test_batch_tokens_must_split_into_micro_batches(capsys, tmp_path, data):
    status, _, err = run(capsys, "--data", data, "--out", tmp_path / "run", *TINY, "--train.batch-tokens", "300")
    assert status == 1 and "not a multiple of micro_batch × seq_len × processes = 16 × 16 × 1 = 256" in err
    assert "--train.batch-tokens 256" in err


def test_fp16_needs_cuda(capsys, tmp_path, data):
    status, _, err = run(capsys, "--data", data, "--out", tmp_path / "run", *TINY, "--train.precision", "fp16",
                         "--device", "cpu")
    assert status == 1 and "fp16" in err and "needs a CUDA GPU" in err


def test_vocab_size_comes_from_the_dataset_and_config_yaml_is_resolved(capsys, tmp_path, data):
    status, out, err = run(capsys, "--data", data, "--out", tmp_path / "run", *TINY, "--model.vocab-size", "999",
                           "--train.max-steps", "1", "--train.eval-batches", "1", "--device", "cpu")
    assert status == 0, err
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["model"]["vocab_size"] == Tokenizer.load(data).vocab_size
    assert (resolved["train"]["precision"], resolved["device"]) == ("fp32", "cpu")
    assert "done: 1 steps" in out and "val loss" in out
