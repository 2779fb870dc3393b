"""Synthetic instruction tasks with exactly one right answer, to show that fine-tuning teaches.

    python -m ling.data.synthetic --task reverse --n 2000 --out reverse.jsonl --format messages
    python -m ling.data.synthetic --task echo --n 2000 --out pairs.jsonl --format preference
    python -m ling.data.synthetic --task echo --n 2000 --out sft.jsonl --format messages --mixed-styles

Tasks: `echo` a word, `reverse` it, `sort` its letters, `add` two 2-digit numbers. Words are
random lowercase strings (no dictionary needed, nothing to memorise from pretraining). The
same seed gives the same file; `held_out_split` keeps evaluation prompts out of training.

Preference data has two styles of the same right answer: UPPER case (chosen) and lower case
(rejected), so what preference tuning must teach is the style alone. `--mixed-styles` writes
supervised data whose answers take either style at random: a model tuned on it prefers the
chosen style on about half of the prompts, the starting point for preference tuning.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ling.atomic import atomic_file
from ling.data.sft import alpaca_messages

Task = Literal["echo", "reverse", "sort", "add"]
TASKS: tuple[str, ...] = ("echo", "reverse", "sort", "add")
INSTRUCTIONS = {"echo": "Repeat the word.", "reverse": "Reverse the word.", "sort": "Sort the letters of the word.",
                "add": "Add the two numbers."}
MAX_DISTINCT = {"add": 90 * 90}
"""tasks with a finite number of distinct prompts (two 2-digit numbers: 90 × 90)"""


def _example(task: str, rng: random.Random) -> dict:
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"instruction": INSTRUCTIONS[task], "input": f"{a} + {b}", "output": str(a + b)}
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
    answer = {"echo": word, "reverse": word[::-1]}.get(task) or "".join(sorted(word))
    return {"instruction": INSTRUCTIONS[task], "input": word, "output": answer}


def make_examples(task: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct Alpaca records ({instruction, input, output}) of `task`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"{task}-{seed}")
    seen, records = set(), []
    limit = MAX_DISTINCT.get(task)
    if limit is not None and n > limit:
        raise ValueError(f"task {task!r} has only {limit} distinct examples; asked for {n}")
    while len(records) < n:
        record = _example(task, rng)
        if record["input"] not in seen:
            seen.add(record["input"])
            records.append(record)
    return records


def held_out_split(records: list[dict], n_held_out: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out): the last `n_held_out` distinct prompts never appear in train."""
    return records[:-n_held_out], records[-n_held_out:]


def to_messages(record: dict) -> dict:
    """An Alpaca record as a chat-messages record (the same prompt text ling's reader builds)."""
    return {"messages": alpaca_messages(record["instruction"], record.get("input"), record["output"])}


CHOSEN_STYLE, REJECTED_STYLE = str.upper, str.lower
"""the two styles of an answer in preference data: chosen UPPER, rejected lower"""


def answer_style(text: str) -> str | None:
    """'chosen' for an answer in the chosen style, 'rejected' in the other, None for neither."""
    text = text.strip()
    if text and text == CHOSEN_STYLE(text) != REJECTED_STYLE(text):
        return "chosen"
    if text and text == REJECTED_STYLE(text) != CHOSEN_STYLE(text):
        return "rejected"
    return None


def mixed_styles(records: list[dict], seed: int = 0) -> list[dict]:
    """The records with each answer in the chosen or the rejected style, at random (50/50)."""
    rng = random.Random(f"styles-{seed}")
    return [{**r, "output": (CHOSEN_STYLE if rng.random() < 0.5 else REJECTED_STYLE)(r["output"])} for r in records]


def to_preference(record: dict, fmt: Literal["preference", "preference-text"] = "preference") -> dict:
    """A preference pair: the record's prompt, its answer in the chosen and in the rejected style
    (chat messages, or plain text with the prompt ending in a newline)."""
    chosen, rejected = CHOSEN_STYLE(record["output"]), REJECTED_STYLE(record["output"])
    if fmt == "preference-text":
        return {"prompt": f"{record['instruction']}\n{record['input']}\n", "chosen": chosen, "rejected": rejected}
    prompt = alpaca_messages(record["instruction"], record.get("input"), "")[:1]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


Format = Literal["alpaca", "messages", "preference", "preference-text"]


def write_jsonl(records: list[dict], path: str | Path, fmt: Format = "alpaca") -> None:
    convert = {"messages": to_messages, "alpaca": lambda r: r}.get(fmt) or (lambda r: to_preference(r, fmt))
    with atomic_file(path) as f:
        for record in records:
            f.write(json.dumps(convert(record), ensure_ascii=False) + "\n")


@dataclass
class SyntheticArgs:
    """Write a synthetic instruction task as JSONL."""

    out: str
    """output .jsonl file"""
    task: Task = "reverse"
    n: int = 2000
    """number of distinct examples"""
    format: Format = "alpaca"
    """alpaca or messages (supervised); preference or preference-text (chosen/rejected pairs)"""
    mixed_styles: bool = False
    """supervised formats: each answer in the chosen or the rejected style at random"""
    seed: int = 0


def main(args: SyntheticArgs) -> None:
    records = make_examples(args.task, args.n, args.seed)
    if args.mixed_styles:
        records = mixed_styles(records, args.seed)
    write_jsonl(records, args.out, args.format)
    print(f"wrote {args.n} '{args.task}' examples ({args.format}) to {args.out}")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(SyntheticArgs))
