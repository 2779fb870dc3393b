"""Preference pairs: read `{prompt, chosen, rejected}` records and encode both completions.

One file, one format, detected from the first record (or forced with `--data-format`), the
two that trl and torchtune read:

- `text`:     {"prompt": str, "chosen": str, "rejected": str} — plain text, no template:
              the tokens of prompt + completion (the completion ends with end-of-sequence);
- `messages`: {"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...]},
              or `chosen`/`rejected` as whole conversations that share the prompt (their
              common first turns are the prompt) — rendered with the tokenizer's chat template.

Only the completion's tokens count in a log-probability: their labels are the next token,
`IGNORE_INDEX` elsewhere (the prompt, and for conversations the template text around the
prompt). A record without `chosen` or `rejected`, with an empty completion or with
`chosen == rejected`, and a prompt that leaves no room for the completion within the
sequence length are bad records: a `LingError` naming file:line and the reason, or counted
with `skip_bad_records`, as for supervised data (`ling.data.sft`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ling.data.batch import IGNORE_INDEX
from ling.data.sft import FIX_HINT, ROLES, BadRecord, _turns, read_records
from ling.data.sft_encode import _token_flags, assistant_spans
from ling.errors import LingError
from ling.tokenizer import Tokenizer

PREFERENCE_FORMATS = ("text", "messages")
@dataclass
class Pair:
    """One preference record: a prompt and two completions, the first one preferred."""

    where: str
    """file:line of the record"""
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass
class Pairs:
    pairs: list[Pair]
    format: str
    skipped: list[str] = field(default_factory=list)
    """'file:line: reason' for each record skipped with --skip-bad-records"""


@dataclass
class EncodedPair:
    """Both sequences of a pair: tokens, and labels that count only the completion."""

    chosen: tuple[list[int], list[int]]
    rejected: tuple[list[int], list[int]]
    index: int = 0
    """the pair's row in a reference log-probability table"""
    truncated: bool = False
    where: str = ""

    @property
    def tokens(self) -> list[int]:
        """Both sequences' tokens (what a packing-free batcher sizes a row by)."""
        return self.chosen[0] + self.rejected[0]


# ---- records -----------------------------------------------------------------------------
def _completion(record: dict, key: str, fmt: str) -> str | list[dict]:
    if key not in record:
        raise BadRecord(f"missing '{key}' (keys present: {', '.join(sorted(record)) or 'none'})")
    value = record[key]
    if fmt == "text":
        if not isinstance(value, str):
            raise BadRecord(f"'{key}' must be a string in text format, got {type(value).__name__}")
        if not value.strip():
            raise BadRecord(f"'{key}' is an empty completion")
        return value
    if isinstance(value, dict):  # a single message
        value = [value]
    return _turns(value, key, "role", "content", {r: r for r in ROLES})


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Whole conversations → (the turns they share, chosen's rest, rejected's rest)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def parse_pair(record: Any, fmt: str, where: str) -> Pair:
    """Validate one decoded JSON value as a preference record of format `fmt`."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    chosen, rejected = _completion(record, "chosen", fmt), _completion(record, "rejected", fmt)
    if fmt == "text":
        prompt = record.get("prompt", "")
        if not isinstance(prompt, str):
            raise BadRecord(f"'prompt' must be a string in text format, got {type(prompt).__name__}")
    elif "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt = _turns(prompt, "prompt", "role", "content", {r: r for r in ROLES}, need_assistant=False)
    else:
        prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
    if chosen == rejected:
        raise BadRecord("'chosen' and 'rejected' are the same, so there is no preference to learn")
    if fmt == "messages":
        for key, turns in (("chosen", chosen), ("rejected", rejected)):
            if not turns or any(m["role"] != "assistant" for m in turns):
                raise BadRecord(f"'{key}' must be the assistant's reply (assistant messages after the prompt)")
            if not any(m["content"].strip() for m in turns):
                raise BadRecord(f"'{key}' is an empty completion")
    return Pair(where, prompt, chosen, rejected)


def detect_preference_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise BadRecord(f"missing '{key}' (keys present: {', '.join(sorted(record)) or 'none'}); preference "
                            "data is {\"prompt\", \"chosen\", \"rejected\"}")
    return "text" if isinstance(record["chosen"], str) else "messages"


def read_pairs(path: str | Path, data_format: str = "auto", skip_bad_records: bool = False) -> Pairs:
    """All preference pairs of a data file; the format is the first record's unless forced."""
    path = Path(path)
    if path.is_dir():
        raise LingError(f"{path}: is a directory; preference data is a .json or .jsonl file")
    if data_format not in ("auto", *PREFERENCE_FORMATS):
        raise LingError(f"--data-format {data_format} is not a preference format; --task dpo reads "
                        f"{' or '.join(PREFERENCE_FORMATS)} (or auto)")
    fmt = None if data_format == "auto" else data_format
    pairs, fmt, skipped = read_records(path, fmt, detect_preference_format, parse_pair, skip_bad_records,
                                       kind="preference ")
    return Pairs(pairs, fmt, skipped)


# ---- encoding ----------------------------------------------------------------------------
def _text_sequence(tokenizer: Tokenizer, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    if tokenizer.eos_id is not None:
        completion_ids.append(tokenizer.eos_id)
    return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def _chat_sequence(tokenizer: Tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[bool]]:
    text, spans = assistant_spans(tokenizer, prompt + completion)
    already = sum(m["role"] == "assistant" for m in prompt)  # earlier replies are context, not the completion
    return _token_flags(tokenizer, text, spans[already:])


def _encode_one(tokenizer: Tokenizer, pair: Pair, completion, seq_len: int,
                key: str) -> tuple[list[int], list[int], bool]:
    if pair.is_chat:
        tokens, counted = _chat_sequence(tokenizer, pair.prompt, completion)
    else:
        tokens, counted = _text_sequence(tokenizer, pair.prompt, completion)
    labels = [tok if flag else IGNORE_INDEX for tok, flag in zip(tokens[1:], counted[1:])] + [IGNORE_INDEX]
    tokens, labels = tokens[:seq_len], labels[:seq_len]
    if all(label == IGNORE_INDEX for label in labels):
        prompt_len = counted.index(True) if True in counted else len(counted)
        raise BadRecord(f"the prompt is {prompt_len} tokens, which leaves no room for the '{key}' completion within "
                        f"the sequence length {seq_len} (--max-seq-len, at most the model's context)")
    return tokens, labels, len(counted) > seq_len


def encode_pair(pair: Pair, tokenizer: Tokenizer, seq_len: int, index: int = 0) -> EncodedPair:
    """Tokens and completion-only labels of both sequences, each cut to `seq_len` tokens."""
    try:
        *chosen, cut_c = _encode_one(tokenizer, pair, pair.chosen, seq_len, "chosen")
        *rejected, cut_r = _encode_one(tokenizer, pair, pair.rejected, seq_len, "rejected")
    except LingError as e:  # e.g. a character a char-level tokenizer does not know
        raise BadRecord(str(e)) from None
    if chosen == rejected:
        raise BadRecord(f"'chosen' and 'rejected' are the same within the sequence length {seq_len}")
    return EncodedPair(tuple(chosen), tuple(rejected), index, cut_c or cut_r, pair.where)


def encode_pairs(pairs: list[Pair], tokenizer: Tokenizer, seq_len: int, skip_bad_records: bool,
                 skipped: list[str], first_index: int = 0) -> list[EncodedPair]:
    """Encode every pair (indices from `first_index`); a bad one stops, or with
    `skip_bad_records` is appended to `skipped`."""
    encoded = []
    for pair in pairs:
        try:
            encoded.append(encode_pair(pair, tokenizer, seq_len, first_index + len(encoded)))
        except BadRecord as e:
            if not skip_bad_records:
                raise LingError(f"{pair.where}: {e} {FIX_HINT}") from None
            skipped.append(f"{pair.where}: {e}")
    return encoded
