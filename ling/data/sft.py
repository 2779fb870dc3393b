"""Fine-tuning records: read instruction, chat and text data in the formats people have.

One file, one format, detected from the first record (or forced with `--data-format`):

- `alpaca`:   {"instruction", "input" (optional), "output"} — a JSON array or JSONL
- `messages`: {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
- `sharegpt`: {"conversations": [{"from": "system"|"human"|"gpt"|..., "value"}, ...]}
- `text`:     {"text"} — raw text for continued pretraining
- `classification` (with `--task classification`): {text_field, label_field}

Every record becomes an `Example` (a conversation, a text, or a text with a label), so the
rest of fine-tuning never sees a format again. A malformed record is a `LingError` naming
file:line and what is wrong; with `skip_bad_records` it is counted (and the first few reasons
kept for the summary) instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from ling.errors import LingError

DataFormat = Literal["auto", "alpaca", "messages", "sharegpt", "text"]
FORMATS = ("alpaca", "messages", "sharegpt", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_DETECT_KEYS = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"), ("text", "text"))


@dataclass
class Example:
    """One training example: a conversation, or a text (with a label for classification)."""

    where: str
    """file:line of the record, for messages about it"""
    messages: list[dict] | None = None
    text: str | None = None
    label: Any = None


@dataclass
class Records:
    """What a data file held: the examples, its format, and the records skipped."""

    examples: list[Example]
    format: str
    skipped: list[str] = field(default_factory=list)
    """'file:line: reason' for each record skipped with --skip-bad-records"""


class BadRecord(Exception):
    """A record that cannot be used; the message says why (file:line is added by the reader)."""


# ---- reading raw JSON objects with their line numbers ------------------------------------
def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, value or BadRecord) for each record of a JSON array or a JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LingError(f"{path}: no such data file") from None
    except UnicodeDecodeError as e:
        raise LingError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):
        yield from _json_array(text)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, BadRecord(f"invalid JSON ({e.msg} at column {e.colno})")


def _json_array(text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on.

    Decoding element by element keeps a useful line number for every record (json.loads
    of the whole array would only say where the first syntax error is).
    """
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)

    def skip_space(j):
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip_space(i)
    if i < n and text[i] == "]":
        return
    while True:
        i = skip_space(i)
        line = text.count("\n", 0, i) + 1
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            # The array is broken from here on: report it and stop (nothing later is trustworthy).
            yield e.lineno, BadRecord(f"invalid JSON ({e.msg} at column {e.colno}); the rest of the array is unreadable")
            return
        yield line, value
        i = skip_space(i)
        if i < n and text[i] == ",":
            i += 1
        elif i < n and text[i] == "]":
            return
        else:
            yield text.count("\n", 0, i) + 1, BadRecord("invalid JSON (expected ',' or ']' after a record)")
            return


# ---- one record → one Example ------------------------------------------------------------
def _string(record: dict, key: str, required: bool = True, allow_empty: bool = False) -> str | None:
    if key not in record:
        if required:
            raise BadRecord(f"missing '{key}' (keys present: {', '.join(sorted(record)) or 'none'})")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"'{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRecord(f"'{key}' is empty")
    return value


def _turns(items: Any, key: str, role_key: str, text_key: str, roles: dict[str, str],
           need_assistant: bool = True) -> list[dict]:
    if not isinstance(items, list):
        raise BadRecord(f"'{key}' must be a list of turns, got {type(items).__name__}")
    if not items:
        raise BadRecord(f"'{key}' is empty")
    messages = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise BadRecord(f"{key}[{i}] must be an object, got {type(turn).__name__}")
        if role_key not in turn or text_key not in turn:
            missing = role_key if role_key not in turn else text_key
            raise BadRecord(f"{key}[{i}] has no '{missing}'")
        role, content = turn[role_key], turn[text_key]
        if role not in roles:
            raise BadRecord(f"{key}[{i}] has unknown {role_key} {role!r} (expected one of {', '.join(roles)})")
        if not isinstance(content, str):
            raise BadRecord(f"{key}[{i}].{text_key} must be a string, got {type(content).__name__}")
        messages.append({"role": roles[role], "content": content})
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise BadRecord(f"{key}[{i}] is a system message; only the first turn may be one")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f"'{key}' has no assistant turn, so there is nothing to learn from it")
    return messages


def alpaca_messages(instruction: str, extra: str | None, output: str) -> list[dict]:
    """An Alpaca record as a conversation: instruction and input are the user's turn."""
    prompt = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def parse_record(record: Any, fmt: str, where: str, label_field: str | None = None,
                 text_field: str = "text") -> Example:
    """Validate one decoded JSON value as format `fmt` and turn it into an `Example`."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    if label_field is not None:
        text = _string(record, text_field)
        if label_field not in record:
            raise BadRecord(f"missing label field '{label_field}'")
        label = record[label_field]
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise BadRecord(f"label '{label_field}' must be a string or an integer, got {type(label).__name__}")
        return Example(where, text=text, label=label)
    if fmt == "alpaca":
        instruction = _string(record, "instruction")
        extra = _string(record, "input", required=False, allow_empty=True)
        output = _string(record, "output")
        return Example(where, messages=alpaca_messages(instruction, extra, output))
    if fmt == "messages":
        if "messages" not in record:
            raise BadRecord(f"missing 'messages' (keys present: {', '.join(sorted(record)) or 'none'})")
        return Example(where, messages=_turns(record["messages"], "messages", "role", "content", {r: r for r in ROLES}))
    if fmt == "sharegpt":
        if "conversations" not in record:
            raise BadRecord(f"missing 'conversations' (keys present: {', '.join(sorted(record)) or 'none'})")
        return Example(where, messages=_turns(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES))
    return Example(where, text=_string(record, "text"))


def detect_format(record: Any) -> str:
    """The format a record's keys say it is in."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    for key, fmt in _DETECT_KEYS:
        if key in record:
            return fmt
    raise BadRecord(
        f"cannot tell the data format (keys: {', '.join(sorted(record)) or 'none'}); expected 'messages', 'conversations', "
        f"'instruction'/'output' or 'text' — or force one with --data-format"
    )


FIX_HINT = "(fix it, or pass --skip-bad-records to skip such records)"


def read_records(path: Path, fmt: str | None, detect, parse, skip_bad_records: bool, kind: str = ""):
    """(items, format, skipped) of a JSON / JSONL data file: `detect(record)` names the format
    from the first usable record unless `fmt` is given, `parse(record, fmt, where)` makes an
    item; a bad record stops with file:line and the reason, or is skipped (and listed) with
    --skip-bad-records."""
    items, skipped = [], []
    for line, record in _json_lines(path):
        where = f"{path}:{line}"
        try:
            if isinstance(record, BadRecord):
                raise record
            if fmt is None:
                fmt = detect(record)
            items.append(parse(record, fmt, where))
        except BadRecord as e:
            if not skip_bad_records:
                hint = "" if fmt is None else f" [{kind}{fmt} format]"
                raise LingError(f"{where}: {e}{hint} {FIX_HINT}") from None
            skipped.append(f"{where}: {e}")
    if not items:
        reason = f"; {len(skipped)} bad record(s) skipped, first: {skipped[0]}" if skipped else ""
        raise LingError(f"{path}: no usable records{reason}")
    return items, fmt, skipped


def read_examples(path: str | Path, data_format: DataFormat = "auto", skip_bad_records: bool = False,
                  label_field: str | None = None, text_field: str = "text") -> Records:
    """All examples of a data file; the format is that of the first usable record unless forced.

    With `label_field` (classification) every record needs `text_field` and `label_field`.
    """
    path = Path(path)
    if path.is_dir():
        raise LingError(f"{path}: is a directory; fine-tuning data is a .json or .jsonl file")
    fmt = "classification" if label_field is not None else (None if data_format == "auto" else data_format)
    examples, fmt, skipped = read_records(
        path, fmt, detect_format, lambda record, fmt, where: parse_record(record, fmt, where, label_field, text_field),
        skip_bad_records)
    return Records(examples, fmt, skipped)
