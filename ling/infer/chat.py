"""`ling chat`: talk to a checkpoint in the terminal, with streaming replies.

A model whose tokenizer has a chat template is prompted with the whole conversation
rendered by that template (system message, then user/assistant turns). A pretrained-only
model has no template: the chat runs in plain continuation mode, where each line you type
is appended to the transcript and the model continues it.

When the conversation no longer fits in the context (prompt + room for the reply), the
oldest turns are dropped first and the chat says so; the system message is always kept.
A reply that fills the context goes on in a sliding window over its most recent part (the
engine's slide), and the chat says so after it.
Commands: /reset (forget the conversation), /system TEXT (set the system message; empty
clears it), /exit (or end of input). Ctrl-C stops a reply; at the prompt it exits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional, TextIO

import tyro

from ling.errors import LingError
from ling.infer.engine import Engine
from ling.infer.generate import ModelArgs, build_engine
from ling.infer.sampling import SamplingParams

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "</s>")
"""special tokens that end an assistant turn in common chat templates (stop tokens in chat)"""

HELP = "commands: /reset  /system TEXT  /exit"


@dataclass
class ChatArgs(ModelArgs):
    """Chat with a checkpoint in the terminal (plain continuation for a model without a chat template)."""

    system: Optional[str] = None
    """system message (chat-template models) or text that starts the transcript (plain mode)"""
    sampling: tyro.conf.OmitArgPrefixes[SamplingParams] = field(
        default_factory=lambda: SamplingParams(max_new_tokens=256, temperature=0.7)
    )


class ChatSession:
    """A conversation with one model: builds prompts from history, trims it to fit, streams replies."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        if engine.tokenizer is None:
            raise LingError("chat needs a tokenizer (tokenizer.json in the checkpoint)")
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.templated = bool(self.tokenizer.chat_template)
        stop_ids = list(params.stop_token_ids)
        if self.templated:
            stop_ids += [i for i in map(self.tokenizer.token_to_id, END_OF_TURN_TOKENS) if i is not None]
        self.params = SamplingParams(**{**vars(params), "stop_token_ids": stop_ids})
        self.system = system or None
        self.turns: list[tuple[str, str]] = []
        """(user, assistant) pairs, oldest first"""

    @property
    def mode(self) -> str:
        return "chat template" if self.templated else "plain continuation"

    def reset(self) -> None:
        self.turns = []

    def prompt_ids(self, turns: list[tuple[str, str]], user: str) -> list[int]:
        if self.templated:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            for question, answer in turns:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": user})
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        parts = ([self.system] if self.system else []) + [q + a for q, a in turns] + [user]
        return self.tokenizer.encode("\n".join(parts))

    def fit(self, user: str) -> tuple[list[int], list[str]]:
        """The prompt for `user` after dropping the oldest turns that do not fit; and notices."""
        room = min(self.params.max_new_tokens, self.engine.max_len // 2)
        notices = []
        dropped = 0
        while True:
            ids = self.prompt_ids(self.turns, user)
            if len(ids) + room <= self.engine.max_len or not self.turns:
                break
            self.turns.pop(0)
            dropped += 1
        if dropped:
            notices.append(f"[context full: dropped the {dropped} oldest exchange(s) to make room]")
        if len(ids) >= self.engine.max_len:
            raise LingError(
                f"this message makes a prompt of {len(ids)} tokens, more than the context holds "
                f"({self.engine.max_len}); send something shorter or /reset"
            )
        return ids, notices

    def reply(self, user: str) -> Iterator[str]:
        """Stream the reply to `user` (notices in brackets first); the exchange joins the history."""
        ids, notices = self.fit(user)
        for notice in notices:
            yield notice + "\n"
        pieces, finish, slides = [], None, 0
        try:
            for _, delta in self.engine.stream([ids], self.params):
                pieces.append(delta.text)
                finish = delta.finish_reason
                slides += delta.slid
                yield delta.text
        finally:
            self.turns.append((user, "".join(pieces)))
        if slides:
            yield (f"\n[the reply went past the context ({self.engine.max_len} tokens): the model went on from "
                   f"its most recent {self.engine.slide_keep} tokens; older exchanges will be dropped next turn]")
        elif finish == "length" and len(ids) + self.params.max_new_tokens > self.engine.max_len:
            yield "\n[context full: the reply was cut (--no-slide); older exchanges will be dropped next turn]"


def repl(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
    """Read lines, run commands, print streamed replies, until /exit or end of input."""
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"ling chat ({session.mode} mode). {HELP}", file=stdout, flush=True)
    while True:
        try:
            line = input("you> ") if interactive and stdin is sys.stdin else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and line == "":
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                print("[conversation reset]", file=stdout, flush=True)
            elif command == "/system":
                session.system = rest.strip() or None
                print(f"[system message {'set' if session.system else 'cleared'}]", file=stdout, flush=True)
            else:
                print(f"[unknown command {command}; {HELP}]", file=stdout, flush=True)
            continue
        try:
            for piece in session.reply(line):
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" [stopped]")
        except LingError as e:
            stdout.write(f"[{e}]")
        stdout.write("\n")
        stdout.flush()


def chat(args: ChatArgs) -> None:
    engine = build_engine(args, max_batch_size=1)
    print(engine.kernels.summary(), file=sys.stderr)
    repl(ChatSession(engine, args.sampling, args.system), sys.stdin, sys.stdout)
