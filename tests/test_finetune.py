"""`ling finetune` end to end on tiny models: it teaches, packing is exact, LoRA resumes, heads classify."""

import dataclasses
import json
import re

import pytest
import torch

from ling import cli
from ling.checkpoint import load_checkpoint, save_model_dir
from ling.config import ModelConfig
from ling.data.sft import Example, alpaca_messages
from ling.data.sft_encode import CHATML_TEMPLATE, IM_END, encode_example, install_chatml
from ling.data.synthetic import make_examples, write_jsonl
from ling.eval.evaluate import EvalArgs, evaluate
from ling.lora import LoRAConfig
from ling.model import build_model
from ling.tokenizer import Tokenizer
from ling.train.config import TrainConfig
from ling.train.finetune import FinetuneArgs, run_finetune

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!+0123456789\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random-init base with a char tokenizer that has no chat template."""
    path = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train_char([ALPHABET])
    torch.manual_seed(0)
    save_model_dir(build_model(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, context_length=64)), tok, path)
    return path


def _args(base, data, out, **overrides):
    train = dict(max_steps=30, batch_tokens=512, micro_batch=8, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                 eval_every=10, eval_batches=4, log_every=1, precision="fp32", seed=0)
    train.update(overrides.pop("train", {}))
    overrides.setdefault("max_seq_len", 64)
    return FinetuneArgs(base=str(base), data=str(data), out=str(out), device="cpu", train=TrainConfig(**train), **overrides)


def _train_losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_full_sft_lowers_val_loss_and_saves_a_chat_model(base, tmp_path):
    write_jsonl(make_examples("reverse", 200), tmp_path / "rev.jsonl", "messages")
    result, summary = run_finetune(_args(base, tmp_path / "rev.jsonl", tmp_path / "run", samples=2), show_summary=False)
    assert summary["final_val_loss"] < summary["base_val_loss"] - 0.5
    assert (summary["train_examples"], summary["val_examples"]) == (190, 10)
    model, tok = load_checkpoint(tmp_path / "run" / "latest")
    assert tok.chat_template == CHATML_TEMPLATE and tok.id_to_token(tok.eos_id) == IM_END
    assert model.cfg.vocab_size == tok.vocab_size == Tokenizer.load(base).vocab_size + 2
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [10, 10, 20, 20, 30, 30]
    assert samples[0]["prompt"].startswith("Reverse the word.\n\n") and samples[0]["reference"]
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert (evals[0]["step"], evals[0]["val_loss"]) == (0, summary["base_val_loss"])  # the curve starts before training
    assert len(evals) == 4 and all("sample_exact_match" in r for r in evals[1:])


def test_packed_and_unpacked_first_step_losses_are_equal(base, tmp_path):
    # 8 conversations of identical length L: packed rows of 2L hold exactly 2 each.
    words = ["abc", "xyz", "kom", "pqr", "def", "uvw", "ghi", "stu"]
    records = [{"instruction": "R", "input": w, "output": w[::-1]} for w in words]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = Tokenizer.load(base)
    install_chatml(tok)
    length = len(encode_example(Example("x", alpaca_messages("R", "abc", "cba")), tok, 1000).tokens)
    assert 2 * length <= 64  # the base's context
    common = dict(val_data=str(tmp_path / "d.jsonl"), max_seq_len=2 * length)
    unpacked = _args(base, tmp_path / "d.jsonl", tmp_path / "u", train=dict(max_steps=1, micro_batch=8,
                     batch_tokens=8 * 2 * length), **common)
    packed = _args(base, tmp_path / "d.jsonl", tmp_path / "p", pack=True, train=dict(max_steps=1, micro_batch=4,
                   batch_tokens=4 * 2 * length), **common)
    _, s_unpacked = run_finetune(unpacked, show_summary=False)
    _, s_packed = run_finetune(packed, show_summary=False)
    assert (s_unpacked["sequences"], s_packed["sequences"]) == (8, 4)
    assert _train_losses(tmp_path / "p")[0] == pytest.approx(_train_losses(tmp_path / "u")[0], rel=1e-5)
    assert s_packed["base_val_loss"] == pytest.approx(s_unpacked["base_val_loss"], rel=1e-5)


def test_lora_trains_only_adapters_and_resumes_exactly(base, tmp_path):
    write_jsonl(make_examples("sort", 120), tmp_path / "sort.jsonl", "alpaca")
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.0)
    full = _args(base, tmp_path / "sort.jsonl", tmp_path / "full", method="lora", lora=lora,
                 train=dict(max_steps=6, eval_every=3))
    _, summary = run_finetune(full, show_summary=False)
    assert summary["trainable_params"] < summary["total_params"] / 5
    assert summary["final_val_loss"] < summary["base_val_loss"]
    latest = tmp_path / "full" / "latest"
    assert {"adapter.json", "adapter.safetensors", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
            "train_state.pt"} <= {p.name for p in latest.iterdir()}  # ling's files, and PEFT's (a Llama-shaped base)
    assert not (latest / "model.safetensors").exists()
    # stop after 3 steps, then resume to 6: the same losses as the uninterrupted run
    half = dataclasses.replace(full, out=str(tmp_path / "half"), train=dataclasses.replace(full.train, max_steps=3))
    run_finetune(half, show_summary=False)
    run_finetune(dataclasses.replace(half, train=full.train, resume="auto"), show_summary=False)
    assert _train_losses(tmp_path / "half") == _train_losses(tmp_path / "full")
    # every command that takes a checkpoint takes the adapter directory (base + adapter, merged)
    merged, tok = load_checkpoint(latest)
    assert merged.cfg.vocab_size == tok.vocab_size and tok.chat_template == CHATML_TEMPLATE


def test_classification_head_reaches_full_accuracy_and_evaluates(base, tmp_path):
    rows = [{"text": f"{w} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i, w in enumerate(["cake", "rain", "sun", "mud", "tea", "ice", "pie", "fog"] * 8)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _args(base, tmp_path / "c.jsonl", tmp_path / "cls", task="classification", val_data=str(tmp_path / "c.jsonl"),
                 train=dict(max_steps=20, eval_every=20))
    _, summary = run_finetune(args, show_summary=False)
    last_eval = [r for r in map(json.loads, (tmp_path / "cls" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"][-1]
    assert last_eval["val_accuracy"] == 1.0
    result = evaluate(EvalArgs(str(tmp_path / "cls" / "latest"), str(tmp_path / "c.jsonl"), device="cpu"))
    assert (result["task"], result["examples"], result["accuracy"]) == ("classification", 64, 1.0)
    assert result["loss"] == pytest.approx(last_eval["val_loss"], rel=1e-4)
    # LoRA + head: the adapter directory and its merge evaluate alike
    lora = dataclasses.replace(args, out=str(tmp_path / "cls-lora"), method="lora",
                               train=dataclasses.replace(args.train, max_steps=4, eval_every=4))
    run_finetune(lora, show_summary=False)
    assert cli.main(["merge", "--adapter", str(tmp_path / "cls-lora" / "latest"), "--out", str(tmp_path / "merged")]) == 0
    scores = [evaluate(EvalArgs(str(p), str(tmp_path / "c.jsonl"), device="cpu"))
              for p in (tmp_path / "cls-lora" / "latest", tmp_path / "merged")]
    assert scores[0]["accuracy"] == scores[1]["accuracy"]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], rel=1e-5)


def test_bad_inputs_are_one_line_errors(base, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    write_jsonl(make_examples("add", 20), good)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"instruction": "Add.", "output": 5}\n')
    unknown_char = tmp_path / "unknown.jsonl"
    unknown_char.write_text('{"instruction": "Say é", "output": "é"}\n' * 3)
    one_label = tmp_path / "one.jsonl"
    one_label.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n')
    cases = [
        (["--base", str(tmp_path / "nope"), "--data", str(good)], "no such checkpoint directory"),
        (["--base", str(base), "--data", str(bad)], r"bad\.jsonl:21: 'output' must be a string, got int"),
        (["--base", str(base), "--data", str(good), "--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
        (["--base", str(base), "--data", str(good), "--method", "lora", "--lora.targets", "q,x"], r"unknown target\(s\) x"),
        (["--base", str(base), "--data", str(one_label), "--task", "classification"], "at least 2 classes"),
        (["--base", str(base), "--data", str(good), "--max-seq-len", "1"], "--max-seq-len must be at least 2"),
        (["--base", str(base), "--data", str(good), "--dropout", "1"], r"--dropout must be in \[0, 1\), got 1.0"),
        (["--base", str(base), "--data", str(good), "--max-seq-len", "8"], "no train example has a token to learn"),
        (["--base", str(base), "--data", str(unknown_char)],
         r"unknown\.jsonl:\d: text contains characters outside this char-level vocabulary: 'é'"),
    ]
    for i, (args, message) in enumerate(cases):
        assert cli.main(["finetune", *args, "--out", str(tmp_path / f"run{i}"), "--device", "cpu"]) == 1, message
        assert re.search(message, capsys.readouterr().err)
        assert not (tmp_path / f"run{i}" / "checkpoints").exists()
    assert cli.main(["finetune", "--base", str(base), "--data", str(bad), "--skip-bad-records", "--out",
                     str(tmp_path / "skip"), "--device", "cpu", "--train.max-steps", "1", "--max-seq-len", "64",
                     "--train.batch-tokens", "512"]) == 0
    assert "1 bad records skipped" in capsys.readouterr().out


def test_dropout_override_applies_to_every_layer_and_is_saved(tmp_path):
    tok = Tokenizer.train_char([ALPHABET])
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, context_length=64, dropout=0.5))
    base = tmp_path / "base"
    save_model_dir(model, tok, base)
    tokens = torch.randint(0, tok.vocab_size, (2, 16))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))  # dropout at 0.5 is active
    model.set_dropout(0.0)
    expected = model.eval()(tokens)
    assert torch.equal(model.train()(tokens), expected)  # no dropout left anywhere, attention included

    data = tmp_path / "reverse.jsonl"
    write_jsonl(make_examples("reverse", 40), data)
    run_finetune(_args(base, data, tmp_path / "run", dropout=0.0, train={"max_steps": 1}), show_summary=False)
    saved, _ = load_checkpoint(tmp_path / "run" / "latest")
    assert saved.cfg.dropout == 0.0
