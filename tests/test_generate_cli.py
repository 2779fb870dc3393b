"""`ling generate` (one prompt, a prompts file, streaming) and `ling chat` (stdin script, template, context)."""

import io
import json
import subprocess
import sys

import pytest

from ling import cli
from ling.checkpoint import save_model_dir
from ling.infer.chat import ChatSession, repl
from ling.infer.engine import Engine
from ling.infer.sampling import SamplingParams
from tests.scripted import SCRIPT, byte_tokenizer, cycle_model, scripted_model

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint whose greedy continuation of 'A' is the rest of SCRIPT, then EOS."""
    tokenizer = byte_tokenizer()
    path = tmp_path_factory.mktemp("gen") / "scripted"
    save_model_dir(scripted_model(tokenizer, tokenizer.encode(SCRIPT) + [tokenizer.eos_id]), tokenizer, path)
    return str(path)


@pytest.fixture(scope="module")
def chat_engine():
    """A chat-template model that answers every message with 'Hi!' (then <|im_end|>)."""
    tokenizer = byte_tokenizer()
    (end,) = tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])[1:]
    tokenizer.chat_template = CHATML
    chain = tokenizer.encode("\nHi!", add_special_tokens=False) + [end]
    return Engine(scripted_model(tokenizer, chain, context_length=128), tokenizer, max_batch_size=1)


@pytest.fixture(scope="module")
def cycle_ckpt(tmp_path_factory):
    """A 64-token-context checkpoint whose greedy continuation of 'A' is 'BCDEFGHA' repeated."""
    tokenizer = byte_tokenizer()
    path = tmp_path_factory.mktemp("gen") / "cycle"
    save_model_dir(cycle_model(tokenizer, "ABCDEFGH", context_length=64), tokenizer, path)
    return str(path)


def run(capsys, *argv):
    code = cli.main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_one_prompt_prints_prompt_and_continuation(ckpt, capsys):
    code, out, err = run(capsys, ckpt, "--prompt", "A", "--temperature", "0", "--dtype", "fp32")
    assert code == 0 and out == SCRIPT + "\n"
    assert "tokens/s" in err
    assert run(capsys, ckpt, "--prompt", "A", "--temperature", "0", "--stream", "--dtype", "fp32")[1] == out


def test_the_summary_names_the_kernels_and_compile_is_skipped_where_it_would_not_pay(ckpt, capsys, tmp_path,
                                                                                     monkeypatch):
    import torch

    from ling.checkpoint import load_checkpoint
    from ling.kernels import compile_decision

    monkeypatch.setenv("LING_CACHE", str(tmp_path))
    model, _ = load_checkpoint(ckpt)
    key = compile_decision.shape_key(model.cfg, torch.float32, 1)
    compile_decision.remember(torch.device("cpu"), key, eager_step=0.002, compiled_step=0.001, compile=30.0)
    code, out, err = run(capsys, ckpt, "--prompt", "A", "--temperature", "0", "--dtype", "fp32", "--compile")
    assert code == 0 and out == SCRIPT + "\n"
    assert "--compile: not compiling: it took ~30 s here and would save ~0 s" in err
    assert "compiling the decode step" not in err and "\n[kernels: " in err


def test_generate_with_a_draft_model_gives_the_same_greedy_text(ckpt, capsys):
    code, out, err = run(capsys, ckpt, "--prompt", "A", "--temperature", "0", "--draft", ckpt, "--dtype", "fp32")
    assert code == 0 and out == SCRIPT + "\n" and "draft tokens accepted: 100%" in err
    code, _, err = run(capsys, ckpt, "--prompt", "A", "--draft", ckpt)
    assert code == 1 and "greedy decoding only" in err


def test_generate_same_seed_same_text(ckpt, capsys):
    # The scripted model is very sure of itself: a high temperature makes its choices random.
    args = [ckpt, "--prompt", "XY", "--temperature", "100", "--max-new-tokens", "30", "--ignore-eos"]
    first = run(capsys, *args, "--seed", "5")[1]
    assert run(capsys, *args, "--seed", "5")[1] == first
    assert run(capsys, *args, "--seed", "6")[1] != first


def test_generate_prompts_file_writes_jsonl_results_in_order(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "A"}\n{"prompt": "A", "max_new_tokens": 4}\n{"prompt": "X", "stop": ["Z"]}\n')
    out_file = tmp_path / "out.jsonl"
    code, _, err = run(capsys, ckpt, "--prompts-file", str(prompts), "--batch-size", "2", "--temperature", "0",
                       "--output", str(out_file), "--dtype", "fp32")
    assert code == 0 and "wrote 3 results" in err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [(r["index"], r["prompt"], r["text"], r["finish_reason"]) for r in records] == [
        (0, "A", SCRIPT[1:], "stop"), (1, "A", "b世", "length"), (2, "X", "Y", "stop"),
    ]
    assert records[1]["completion_tokens"] == 4 and records[1]["prompt_tokens"] == 1


def test_generate_plain_prompts_file_to_stdout_with_stream(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A\n\nX\n")
    code, out, _ = run(capsys, ckpt, "--prompts-file", str(prompts), "--temperature", "0", "--stream", "--dtype", "fp32")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and sorted((r["prompt"], r["text"]) for r in records) == [("A", SCRIPT[1:]), ("X", "YZ")]


def test_a_bad_prompt_in_a_file_is_named_by_its_line(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A\n" + "A" * 70 + "\n")
    code, _, err = run(capsys, ckpt, "--prompts-file", str(prompts))
    assert code == 1 and f"{prompts}:2: the prompt is 70 tokens" in err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "A" * 70], "the prompt is 70 tokens but the context holds 64"),
    (["--prompt", "A", "--prompts-file", "f"], "exactly one of --prompt"),
    (["--prompts-file", "missing.txt"], "no such prompts file"),
    (["--prompt", "A", "--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_generate_errors_are_one_clear_line(ckpt, capsys, argv, message):
    code, _, err = run(capsys, ckpt, *argv)
    assert code == 1 and message in err and "Traceback" not in err


def test_chat_and_generate_from_the_command_line(ckpt):
    script = "A\n/system be brief\nX\n/reset\n/nope\n/exit\nnever read\n"
    proc = subprocess.run([sys.executable, "-m", "ling", "chat", ckpt, "--temperature", "0"], input=script,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "ling chat (plain continuation mode). commands: /reset  /system TEXT  /exit",
        SCRIPT[1:],
        "[system message set]",
        "YZ",
        "[conversation reset]",
        "[unknown command /nope; commands: /reset  /system TEXT  /exit]",
    ]
    proc = subprocess.run([sys.executable, "-m", "ling", "generate", ckpt, "--prompt", "A", "--temperature", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == SCRIPT + "\n"


def test_chat_uses_the_template_keeps_history_and_trims_the_oldest(chat_engine):
    session = ChatSession(chat_engine, SamplingParams(temperature=0, max_new_tokens=8), system="Be kind.")
    out = io.StringIO()
    repl(session, io.StringIO("hello\nhow are you?\n"), out)
    assert out.getvalue().splitlines()[1:] == ["Hi!", "Hi!"]
    assert session.turns == [("hello", "Hi!"), ("how are you?", "Hi!")]
    rendered = chat_engine.tokenizer.decode(session.prompt_ids(session.turns, "next"))
    assert rendered.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nhello<|im_end|>")
    # Each exchange is ~30 tokens of a 128-token context: the fourth message drops the oldest.
    replies = [list(session.reply(f"message {i}")) for i in range(3)]
    assert not any("context full" in piece for piece in replies[0])
    assert replies[-1][0].startswith("[context full: dropped the")
    assert session.turns[0][0] != "hello" and session.turns[-1] == ("message 2", "Hi!")


def test_chat_rejects_a_message_longer_than_the_context_and_carries_on(chat_engine):
    session = ChatSession(chat_engine, SamplingParams(temperature=0, max_new_tokens=8))
    out = io.StringIO()
    repl(session, io.StringIO("x" * 200 + "\nhello\n"), out)
    lines = out.getvalue().splitlines()
    assert "more than the context holds (128)" in lines[1]
    assert lines[2] == "Hi!" and session.turns == [("hello", "Hi!")]


def test_generate_goes_past_the_context_in_a_sliding_window_and_says_so(cycle_ckpt):
    argv = [sys.executable, "-m", "ling", "generate", cycle_ckpt, "--prompt", "A", "--max-new-tokens", "200",
            "--temperature", "0", "--ignore-eos", "--kernels", "reference"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "A" + "BCDEFGHA" * 25 + "\n"  # 200 tokens from a 64-token context
    assert proc.stderr.startswith("[200 tokens in ")
    assert ("[went past the context (64 tokens) in a sliding window: 8 time(s) the most recent 48 tokens were kept "
            "and generation went on from them]") in proc.stderr


def test_with_no_slide_generate_stops_when_the_context_is_full(cycle_ckpt, capsys):
    code, out, err = run(capsys, cycle_ckpt, "--prompt", "A", "--max-new-tokens", "200", "--temperature", "0",
                         "--ignore-eos", "--kernels", "reference", "--no-slide")
    assert code == 0 and out == "A" + ("BCDEFGHA" * 8)[:63] + "\n"
    assert err.startswith("[63 tokens in ") and "sliding window" not in err


def test_a_prompts_file_slides_too_and_the_summary_counts_the_prompts(cycle_ckpt, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A\nAB\n")
    code, out, err = run(capsys, cycle_ckpt, "--prompts-file", str(prompts), "--max-new-tokens", "70",
                         "--temperature", "0", "--ignore-eos", "--kernels", "reference")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["completion_tokens"], r["finish_reason"]) for r in records] == [(70, "length")] * 2
    assert records[1]["text"] == ("CDEFGHAB" * 9)[:70]
    assert "[2 prompt(s) went past the context (64 tokens) in a sliding window: 2 time(s)" in err


def test_a_chat_reply_goes_past_the_context_and_the_chat_says_so(cycle_ckpt):
    engine = Engine(cycle_ckpt, max_batch_size=1, kernels="reference")
    session = ChatSession(engine, SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True))
    out = io.StringIO()
    repl(session, io.StringIO("A\n"), out)
    lines = out.getvalue().splitlines()
    assert lines[1] == ("BCDEFGHA" * 13)[:100]
    assert lines[2] == ("[the reply went past the context (64 tokens): the model went on from its most recent 48 "
                        "tokens; older exchanges will be dropped next turn]")
