"""Exact match: does the model, asked a held-out prompt, reply exactly the reference answer?

The prompt is a conversation up to its last assistant turn, formatted with the model's chat
template (and the generation prompt); the model answers greedily until its end-of-sequence
token; the answer counts if it equals the reference once surrounding whitespace is removed.
"""

from __future__ import annotations

from tqdm import tqdm

from ling.data.sft import Example
from ling.data.sft_encode import encode_prompt
from ling.infer.generate import generate_tokens
from ling.tokenizer import Tokenizer


def reply_prompts(examples: list[Example], tokenizer: Tokenizer, max_len: int) -> list[dict]:
    """For each conversation: its last user turn (`prompt`), the prompt token ids (`ids`) and
    the last assistant reply (`reference`). Prompts of `max_len` tokens or more are left out."""
    prompts = []
    for example in examples:
        if example.messages is None:
            continue
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        ids = encode_prompt(tokenizer, example.messages[:last])
        if len(ids) < max_len:
            prompts.append({"prompt": example.messages[last - 1]["content"] if last else "", "ids": ids,
                            "reference": example.messages[last]["content"]})
    return prompts


def greedy_reply(model, tokenizer: Tokenizer, ids: list[int], max_new_tokens: int, autocast) -> str:
    """The model's greedy continuation of `ids`, up to (not including) its end-of-sequence token."""
    stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    with autocast:
        out = list(generate_tokens(model, ids, max_new_tokens, temperature=0, stop_ids=stop))
    if out and out[-1] in stop:
        out = out[:-1]
    return tokenizer.decode(out, skip_special_tokens=True)


def answer_all(model, tokenizer: Tokenizer, prompts: list[dict], max_new_tokens: int, autocast,
               progress: bool = False) -> tuple[float, list[dict]]:
    """(exact-match rate, rows of prompt / reference / answer / match) over `prompts`."""
    rows = []
    for p in tqdm(prompts, desc="answers", disable=not progress):
        answer = greedy_reply(model, tokenizer, p["ids"], max_new_tokens, autocast)
        rows.append({"prompt": p["prompt"], "reference": p["reference"], "answer": answer,
                     "match": answer.strip() == p["reference"].strip()})
    return sum(r["match"] for r in rows) / max(len(rows), 1), rows
