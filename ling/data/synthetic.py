"""Synthetic instruction tasks with exactly one right answer, to show that fine-tuning teaches.

    python -m ling.data.synthetic --task reverse --n 2000 --out reverse.jsonl --format messages

Tasks: `reverse` a word, `sort` its letters, `add` two 2-digit numbers. Words are random
lowercase strings (no dictionary needed, nothing to memorise from pretraining). The same
seed gives the same file; `held_out_split` keeps evaluation prompts out of training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ling.atomic import atomic_file
from ling.data.sft import alpaca_messages

Task = Literal["reverse", "sort", "add"]
TASKS: tuple[str, ...] = ("reverse", "sort", "add")
INSTRUCTIONS = {"reverse": "Reverse the word.", "sort": "Sort the letters of the word.", "add": "Add the two numbers."}
MAX_DISTINCT = {"add": 90 * 90}
"""tasks with a finite number of distinct prompts (two 2-digit numbers: 90 × 90)"""


def _example(task: str, rng: random.Random) -> dict:
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"instruction": INSTRUCTIONS[task], "input": f"{a} + {b}", "output": str(a + b)}
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
    answer = word[::-1] if task == "reverse" else "".join(sorted(word))
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


def write_jsonl(records: list[dict], path: str | Path, fmt: Literal["alpaca", "messages"] = "alpaca") -> None:
    with atomic_file(path) as f:
        for record in records:
            f.write(json.dumps(to_messages(record) if fmt == "messages" else record, ensure_ascii=False) + "\n")


@dataclass
class SyntheticArgs:
    """Write a synthetic instruction task as JSONL."""

    out: str
    """output .jsonl file"""
    task: Task = "reverse"
    n: int = 2000
    """number of distinct examples"""
    format: Literal["alpaca", "messages"] = "alpaca"
    seed: int = 0


def main(args: SyntheticArgs) -> None:
    write_jsonl(make_examples(args.task, args.n, args.seed), args.out, args.format)
    print(f"wrote {args.n} '{args.task}' examples ({args.format}) to {args.out}")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(SyntheticArgs))
