"""The README is true: its shell blocks run in order, as written, and every path they name exists.

`test_the_readme_runs_in_order` runs every ```bash block of README.md top to bottom in one
empty working directory that sees the checkout's `configs/` and `README.md` (a newcomer runs
them from the checkout's root), with the tiny settings of `OVERRIDES` so that it takes
seconds, and after each command checks that every path the command names exists.

Markers, in README.md itself (an HTML comment, invisible on the rendered page), directly
before a block:

    <!-- readme-test: skip (why) -->      the block is not run, for the reason given
                                          (needs a download, a GPU, another process...)

Every other shell block runs. A new README block is covered by writing it so that it runs
after the blocks before it (a command whose inputs an earlier block made), or by marking it
with a reason; a command of a kind this runner does not know fails the fast test below, so
none goes unchecked by mistake. How each kind of command runs:

- `ling ...` in this process (`ling.cli.main`), the flags of `OVERRIDES` appended (later
  flags win); `ling chat` reads `CHAT_INPUT` from stdin; `ling serve` starts in the
  background on a free port, which replaces `127.0.0.1:8000` in the commands after it, and
  stops at the end;
- `python -m MODULE ...` as `python -m` does (`runpy`), with `REPLACE` applied;
- `curl ...` as a subprocess that fails on an HTTP error (`--fail-with-body`: the README's
  answers must be answers, not 404s);
- `pip install -e '.[EXTRA]'` is not run (no network in tests): EXTRA must be an extra of
  pyproject.toml;
- a line with shell syntax (`>`, `|`) with bash.

`REPLACE` swaps text before a command runs (the tinyshakespeare URL for a local stand-in:
tests never touch the network); each of its keys must occur in the README, so an override
cannot go stale silently.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
import torch

from ling import cli
from ling.errors import LingError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL = ("bash", "sh", "shell")
MARKER = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")

TINYSHAKESPEARE = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
REPLACE = {
    TINYSHAKESPEARE: "tinyshakespeare.txt",  # written by the test: a few kB with every printable character
    "--n 40000": "--n 200",  # synthetic fine-tuning examples
}
TINY_MODEL = "--model.n-layer 1 --model.n-embd 32 --model.n-head 2 --model.context-length 128"  # fits a chat example
TINY_TRAIN = ("--train.max-steps 2 --train.eval-every 2 --train.eval-batches 1 --train.batch-tokens 512 "
              "--train.micro-batch 4 --train.log-every 1")
OVERRIDES = {  # the first command prefix that matches appends its flags
    "ling pretrain --config": "--train.max-steps 3",  # a resumed run: the same model, a step more
    "ling pretrain": f"{TINY_MODEL} {TINY_TRAIN}",
    "ling finetune": f"{TINY_TRAIN} --samples 1 --sample-tokens 8",
    # kernel timing (tests/test_kernels.py) would only cost time here
    "ling generate": "--kernels reference",
    "ling chat": "--kernels reference --max-new-tokens 16",
    "ling serve": "--kernels reference --port 0",
}
CHAT_INPUT = "Hello!\n"
SERVER = "127.0.0.1:8000"
PATH_LIKE = re.compile(r"[\w.~-]+(/[\w.~-]+)*/?")
SUFFIXES = {".txt", ".md", ".json", ".jsonl", ".yaml", ".yml", ".gguf", ".png", ".bin"}


@dataclass
class Block:
    line: int
    """where the block starts in README.md (1-based)"""
    language: str
    text: str
    skip: str | None = None
    """the marker's reason, if the block is not run"""

    def commands(self) -> list[str]:
        """Logical command lines: continuations joined, blank and comment lines dropped."""
        joined = self.text.replace("\\\n", " ")
        return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of the README, with the skip marker of the line before it."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous.strip())
        blocks.append(Block(i + 1, fence[1], "\n".join(lines[i + 1:end]) + "\n", marker["reason"] if marker else None))
        i = end + 1
    return blocks


def shell_blocks() -> list[Block]:
    return [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.language in SHELL]


def kind(command: str) -> str:
    """How the runner runs a command line (see the module docstring)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    if any(set(token) <= set("|&;<>") for token in lexer):  # redirections, pipes, lists
        return "bash"
    words = shlex.split(command, comments=True)
    if words[0] == "ling":
        return "serve" if words[1:2] == ["serve"] else "ling"
    if words[:2] == ["python", "-m"]:
        return "python"
    if words[0] in ("curl", "pip"):
        return words[0]
    return "unknown"


def extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


# ---- fast checks ---------------------------------------------------------------------------------
def test_every_shell_block_runs_or_says_why_not():
    blocks = shell_blocks()
    run = [b for b in blocks if b.skip is None]
    assert len(run) >= 8, "the runner found too few README blocks to run: has the fence syntax changed?"
    for block in run:
        for command in block.commands():
            assert kind(command) != "unknown", (
                f"README.md:{block.line}: this test does not know how to run {command!r}: teach it "
                f"(tests/test_readme.py) or mark the block <!-- readme-test: skip (why) -->")
    assert all(b.skip.strip() for b in blocks if b.skip is not None)
    text = README.read_text(encoding="utf-8")
    assert all(old in text for old in REPLACE), "an override replaces text the README no longer has"
    assert not re.search(r"readme-test(?!: skip \()", text), "a readme-test marker this test does not read"


def test_make_demo_installs_the_extras_and_ends_with_how_to_activate():
    # Under `make test` this runs inside make, which would wrap the output in "Entering/Leaving directory" lines.
    proc = subprocess.run(["make", "--no-print-directory", "-n", "demo", "VENV=/nonexistent/venv"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any('pip install --quiet -e ".[hf,serve,gguf]"' in line for line in lines)
    assert "source /nonexistent/venv/bin/activate" in lines[-1]


def test_missing_extra_messages_give_the_command_that_works_from_a_checkout():
    found = []
    for path in sorted((ROOT / "ling").rglob("*.py")) + [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for command in re.findall(r"pip install[^`\"\n]*", line):
                found.append(command)
                match = re.match(r"pip install -e '\.\[(\w+)\]'", command)
                assert match and match[1] in extras(), f"{path.relative_to(ROOT)}:{number}: {command!r}"
    assert len(found) >= 4  # serve, gguf (two), data: the messages and the docs


def test_ling_serve_without_the_serve_extra_says_how_to_install_it(monkeypatch):
    from ling.serve.server import ServeArgs, serve

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    with pytest.raises(LingError, match=r"needs the serve extra \(fastapi is missing\): pip install -e '\.\[serve\]'"):
        serve(ServeArgs(ckpt="unused"))


def test_a_run_directory_given_as_a_checkpoint_suggests_its_best(tmp_path):
    run = tmp_path / "runs" / "x"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "best").symlink_to("checkpoints/step-4")
    proc = subprocess.run([sys.executable, "-m", "ling", "generate", str(run), "--prompt", "A"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr == (f"error: {run} is a run directory, not a checkpoint: give {run / 'best'} "
                           f"(its best checkpoint)\n")


# ---- the README, run ---------------------------------------------------------------------------
def stand_in_text() -> str:
    """A small text in tinyshakespeare's shape, with every printable character (the
    synthetic tasks, chat templates and prompts of the README stay in its vocabulary)."""
    lines = ["ROMEO:", "But soft, what light through yonder window breaks?", "", "JULIET:",
             "O Romeo, Romeo, wherefore art thou Romeo?", "", string.printable.strip(), ""]
    return "\n".join(lines * 200)


class Runner:
    """Runs README commands in the current directory (see the module docstring)."""

    def __init__(self):
        self.server: subprocess.Popen | None = None
        self.address = SERVER

    def run(self, command: str, where: str) -> None:
        for old, new in REPLACE.items():
            command = command.replace(old, new)
        command = command.replace(SERVER, self.address)
        how = kind(command)
        words = shlex.split(command, comments=True)
        for prefix, flags in OVERRIDES.items():
            if command.startswith(prefix):
                words += flags.split()
                break
        if how == "ling":
            stdin = io.StringIO(CHAT_INPUT)
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err, \
                    _stdin(stdin):
                code = cli.main(words[1:])
            printed = out.getvalue()[-2000:] + "\n" + err.getvalue()[-2000:]
            assert code == 0, f"{where}: {command!r} exited with {code}\n{printed}"
        elif how == "serve":
            self.start_server(words, where)
        elif how == "python":
            with _argv(words[2:]), contextlib.redirect_stdout(io.StringIO()):
                runpy.run_module(words[2], run_name="__main__", alter_sys=True)
        elif how == "curl":
            proc = subprocess.run(["curl", "--fail-with-body", "-sS", "--max-time", "120", *words[1:]],
                                  capture_output=True, text=True)
            assert proc.returncode == 0, f"{where}: {command!r}: {proc.stdout[-1000:]} {proc.stderr[-1000:]}"
        elif how == "pip":
            extra = re.fullmatch(r"\.\[(\w+)\]", words[3]) if words[:3] == ["pip", "install", "-e"] else None
            assert extra and extra[1] in extras(), f"{where}: {command!r} installs no extra of pyproject.toml"
            return
        else:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], capture_output=True, text=True)
            assert proc.returncode == 0, f"{where}: {command!r}: {proc.stderr[-2000:]}"
        self.check_paths(words, where)

    def start_server(self, words: list[str], where: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.server = subprocess.Popen([sys.executable, "-m", "ling", *words[1:]], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, env=env)
        seen = []
        for line in self.server.stdout:  # until the startup line (or the process ends: then it failed)
            seen.append(line)
            started = re.match(r"serving '(?P<name>[^']+)' at http://(?P<address>[\d.]+:\d+)/v1", line)
            if started:
                self.address = started["address"]
                self.model_name = started["name"]
                return
        raise AssertionError(f"{where}: ling serve did not start:\n{''.join(seen)[-3000:]}")

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.communicate(timeout=60)

    @staticmethod
    def check_paths(words: list[str], where: str) -> None:
        for word in words[1:]:
            if word.startswith("-") or "://" in word or not PATH_LIKE.fullmatch(word):
                continue
            if "/" in word or Path(word).suffix in SUFFIXES:
                assert Path(word).exists(), f"{where}: the command names {word}, which does not exist after it ran"


@contextlib.contextmanager
def _stdin(stream):
    saved, sys.stdin = sys.stdin, stream
    try:
        yield
    finally:
        sys.stdin = saved


@contextlib.contextmanager
def _argv(argv):
    saved, sys.argv = sys.argv, list(argv)
    try:
        yield
    finally:
        sys.argv = saved


@pytest.mark.slow
def test_the_readme_runs_in_order(tmp_path, monkeypatch):
    for name in ("configs", "README.md"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "tinyshakespeare.txt").write_text(stand_in_text(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server's process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: on a busy machine two threads mostly wait for each other
    runner, ran = Runner(), []
    try:
        for block in shell_blocks():
            if block.skip is not None:
                continue
            for command in block.commands():
                runner.run(command, f"README.md:{block.line}")
                ran.append(command.split()[:2])
    finally:
        runner.stop_server()
        torch.set_num_threads(threads)
    assert ["ling", "serve"] in ran and ["curl", "-N"] in ran  # the serve section ran against its server
