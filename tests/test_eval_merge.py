"""`ling eval` metrics and `ling merge` of a LoRA adapter directory."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ling import cli
from ling.adapter_dir import save_adapter
from ling.checkpoint import load_checkpoint, save_model_dir
from ling.config import ModelConfig
from ling.data.dataset import open_dataset
from ling.data.prepare import PrepareArgs, prepare
from ling.data.sft_encode import install_chatml
from ling.eval.evaluate import EvalArgs, evaluate
from ling.lora import LoRAConfig, apply_lora
from ling.model import build_model
from ling.tokenizer import Tokenizer
from ling.vocab import resize_vocab

TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 3


@pytest.fixture
def checkpoint(tmp_path):
    tok = Tokenizer.train_char([TEXT + "abcdefghijklmnopqrstuvwxyz?"])
    model = build_model(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, context_length=32))
    save_model_dir(model, tok, tmp_path / "base")
    return tmp_path / "base", model.eval(), tok


def _window_nll(model, ids, T):
    nll = 0.0
    for i in range(0, len(ids) - 1, T):
        w = ids[i:i + T + 1]
        with torch.no_grad():
            nll += F.cross_entropy(model(torch.tensor([w[:-1]]))[0], torch.tensor(w[1:]), reduction="sum").item()
    return nll


def test_text_metrics_are_exact(checkpoint, tmp_path):
    path, model, tok = checkpoint
    (tmp_path / "t.txt").write_text(TEXT)
    result = evaluate(EvalArgs(str(path), str(tmp_path / "t.txt"), device="cpu", batch_size=3))
    ids = [tok.eos_id] + tok.encode(TEXT) + [tok.eos_id]
    nll = _window_nll(model, ids, 32)
    assert result["tokens"] == len(ids) - 1 and result["bytes"] == len(TEXT.encode())
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-5)
    # the same text as JSONL {"text"} records and as a prepared dataset directory
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    assert evaluate(EvalArgs(str(path), str(tmp_path / "t.jsonl"), device="cpu"))["loss"] == pytest.approx(result["loss"], rel=1e-6)
    # a dataset directory from `ling prepare`: its val split
    (tmp_path / "corpus.txt").write_text(TEXT * 4)
    prepare(PrepareArgs(output=str(tmp_path / "dataset"), tokenizer=str(path), input=[str(tmp_path / "corpus.txt")]))
    val = open_dataset(tmp_path / "dataset").val.tolist()
    from_dir = evaluate(EvalArgs(str(path), str(tmp_path / "dataset"), device="cpu", out=str(tmp_path / "r.json")))
    assert from_dir["loss"] == pytest.approx(_window_nll(model, val, 32) / (len(val) - 1), rel=1e-5)
    assert json.loads((tmp_path / "r.json").read_text())["tokens"] == len(val) - 1


def test_chat_data_scores_only_the_replies(checkpoint, tmp_path):
    path, model, tok = checkpoint
    install_chatml(tok)
    resize_vocab(model, tok.vocab_size)
    save_model_dir(model, tok, tmp_path / "chat")
    record = {"messages": [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "sat"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(record) + "\n")
    result = evaluate(EvalArgs(str(tmp_path / "chat"), str(tmp_path / "c.jsonl"), device="cpu"))
    assert (result["task"], result["tokens"]) == ("sft", 4)  # 's', 'a', 't', <|im_end|>
    ids = tok.encode(tok.apply_chat_template(record["messages"]), add_special_tokens=False)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).log_softmax(-1)[0]
    start = len(tok.encode(tok.apply_chat_template(record["messages"][:1], add_generation_prompt=True)))
    expected = -sum(logp[i - 1, ids[i]].item() for i in range(start, start + 4)) / 4
    assert result["loss"] == pytest.approx(expected, rel=1e-5)


def test_eval_bad_inputs(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    (tmp_path / "c.jsonl").write_text(json.dumps({"instruction": "i", "output": "o"}) + "\n")
    for args, message in [
        ([str(path), "--data", str(tmp_path / "nope.txt")], "nope.txt: no such file or directory"),
        ([str(path), "--data", str(tmp_path / "c.jsonl")], "has no chat template"),
        ([str(tmp_path), "--data", str(tmp_path / "c.jsonl")], "missing config.json"),
    ]:
        assert cli.main(["eval", *args]) == 1
        assert message in capsys.readouterr().err


def test_merge_writes_a_checkpoint_equal_to_base_plus_adapter(checkpoint, tmp_path, capsys):
    path, model, tok = checkpoint
    new_ids = install_chatml(tok)
    resize_vocab(model, tok.vocab_size)
    config = LoRAConfig(rank=4, targets="q,k,v,o,gate,up,down", dropout=0.0)
    apply_lora(model, config, new_ids)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(model, config, tmp_path / "adapter", base=str(path), train_token_ids=new_ids)
    tok.save(tmp_path / "adapter")
    tokens = torch.tensor([[1, 2, 3, new_ids[0], 5, new_ids[1]]])
    with torch.no_grad():
        expected = model(tokens)
    r = subprocess.run([sys.executable, "-m", "ling", "merge", "--adapter", str(tmp_path / "adapter"),
                        "--out", str(tmp_path / "merged")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged, merged_tok = load_checkpoint(tmp_path / "merged")
    assert merged_tok.chat_template == tok.chat_template and merged.cfg.vocab_size == tok.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(tokens), expected)
    adapter = str(tmp_path / "adapter")
    for args, message in [
        (["--adapter", adapter, "--out", str(tmp_path / "merged")], "already exists"),
        (["--adapter", str(path), "--out", str(tmp_path / "m2")], "no adapter.json here"),
        (["--adapter", adapter, "--base", str(tmp_path / "gone"), "--out", str(tmp_path / "m3")], "does not exist; pass --base"),
    ]:
        assert cli.main(["merge", *args]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m3").exists()
