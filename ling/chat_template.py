"""Chat templates: render a conversation to a prompt string with the model's jinja2 template.

Rendering follows transformers' `apply_chat_template` (sandboxed jinja2, trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, the
special tokens as variables), so a prompt formatted here is byte-identical to one formatted
by transformers. Templates that mark assistant text with `{% generation %}` also report where
that text is, which fine-tuning uses to mask the loss.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ling.errors import LingError

_spans: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("generation_spans", default=None)


class _GenerationTag(Extension):
    """`{% generation %}…{% endgeneration %}`: renders its body and records its character span."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller):
        text = caller()
        tracking = _spans.get()
        if tracking is not None:
            blocks, spans = tracking
            start = len("".join(blocks))
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LingError(f"chat template, line {e.lineno}: {e.message}") from None


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    """A message's reasoning under every name templates read it by (as transformers does):
    Qwen3 templates read `reasoning_content`, gpt-oss ones `thinking`."""
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False,
                special_tokens: dict[str, str] | None = None, **variables) -> str:
    """The conversation as one prompt string."""
    return render_chat_with_spans(template, messages, add_generation_prompt, special_tokens, **variables)[0]


def render_chat_with_spans(template: str, messages: list[dict], add_generation_prompt: bool = False,
                           special_tokens: dict[str, str] | None = None,
                           **variables) -> tuple[str, list[tuple[int, int]]]:
    """The prompt string, and the character spans inside `{% generation %}` blocks."""
    compiled = _compile(template)
    messages = [_alias_reasoning(m) for m in messages]
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _spans.set((blocks, spans))
    try:
        # transformers always defines `tools` and `documents` (templates test `tools is not none`).
        context = {"tools": None, "documents": None, **(special_tokens or {}), **variables}
        for block in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **context):
            blocks.append(block)
    except jinja2.TemplateError as e:
        raise LingError(f"chat template error: {e}") from None
    finally:
        _spans.reset(token)
    return "".join(blocks), spans
