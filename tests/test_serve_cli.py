"""The `ling serve` command as a real process: startup, argument errors, graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from ling import cli
from tests.serving import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve-cli") / "tiny-chat", context_length=2048)


def start(ckpt, *flags):
    """`ling serve` on a free port; returns the process and its base URL (read from its first line)."""
    proc = subprocess.Popen([sys.executable, "-m", "ling", "serve", str(ckpt), "--port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
    assert match, line + proc.stderr.read()
    return proc, match.group(1)


def stream_after_sigterm(proc, url):
    """Start a long greedy stream, SIGTERM the server after its first token, return every event."""
    body = {"prompt": "Speak", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        events = [next(line for line in lines if line.startswith("data: {"))]
        proc.send_signal(signal.SIGTERM)
        events += [line for line in lines if line.startswith("data: ")]
    return events


def finish_reasons(events):
    return [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events if e != "data: [DONE]"]


@pytest.mark.slow
def test_sigterm_lets_a_stream_finish_then_exits_cleanly(ckpt):
    proc, url = start(ckpt)
    assert httpx.get(url + "/health").json()["status"] == "ok"
    events = stream_after_sigterm(proc, url)
    assert events[-1] == "data: [DONE]"
    assert finish_reasons(events)[-1] == "length"
    assert proc.wait(timeout=60) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


@pytest.mark.slow
def test_sigterm_past_the_shutdown_timeout_cancels_streams_cleanly(ckpt):
    proc, url = start(ckpt, "--shutdown-timeout", "0")
    events = stream_after_sigterm(proc, url)
    assert events[-1] == "data: [DONE]"
    assert finish_reasons(events)[-1] == "abort"
    assert proc.wait(timeout=60) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down


@pytest.mark.parametrize("flags,message", [
    (["--max-model-len", "5000"], "--max-model-len must be between 2 and the model's context length 2048, got 5000"),
    (["--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
])
def test_bad_arguments_are_one_line_errors(ckpt, flags, message, capsys):
    assert cli.main(["serve", str(ckpt), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_a_port_in_use_is_a_one_line_error(ckpt, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(ckpt), "--port", str(port)]) == 1
    assert capsys.readouterr().err.startswith(f"error: cannot listen on 127.0.0.1:{port} (Address already in use)")


def test_compile_flag_compiles_the_decode_step_before_serving(ckpt, monkeypatch, capsys):
    from ling.infer import Engine
    from ling.serve.server import ServeArgs, build_state

    warmed = []
    monkeypatch.setattr(Engine, "warm_up", lambda self: warmed.append(self))  # the compilation itself: test_engine
    state = build_state(ServeArgs(ckpt=str(ckpt), compile=True))
    engine = state.scheduler.engine
    assert warmed == [engine] and engine._decode_model is not engine.model  # the torch.compile wrapper
    assert "compiling the decode step" in capsys.readouterr().out
    plain = build_state(ServeArgs(ckpt=str(ckpt))).scheduler.engine
    assert plain._decode_model is plain.model and warmed == [engine]
