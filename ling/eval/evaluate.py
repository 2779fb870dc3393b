"""`ling eval CKPT --data ...`: how good is a checkpoint on some data (and `--tasks`: on
standard benchmarks through lm-evaluation-harness, see `ling.eval.tasks`).

- A language model on text (a prepared dataset directory, a .txt file, or a JSONL of
  {"text"} records): loss, perplexity and bits per byte over every token. The text is cut
  into context-length windows that overlap by one token, so each token is predicted once.
- A language model on instruction/chat data (Alpaca, messages, ShareGPT): loss and
  perplexity of the assistant's replies given the prompts, rendered with the model's chat
  template — the fine-tuning validation loss.
- A classifier (a checkpoint with a task head): accuracy and loss on labelled JSONL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import tyro
from tqdm import tqdm

from ling.atomic import atomic_file
from ling.checkpoint import load_checkpoint
from ling.data.dataset import open_dataset
from ling.data.sft import DataFormat, read_examples
from ling.data.sft_batches import SFTBatches
from ling.data.sft_encode import Encoded, encode_example, encode_labelled
from ling.device import pick_device
from ling.errors import LingError
from ling.eval.exact_match import answer_all, reply_prompts
from ling.eval.metrics import score_classifier, score_lm, text_windows
from ling.model import autocast_context
from ling.train.heads import is_classifier_dir, load_classifier


@dataclass
class EvalArgs:
    """Evaluate a checkpoint: loss / perplexity / bits per byte, or a classifier's accuracy."""

    checkpoint: tyro.conf.Positional[str]
    """checkpoint: a ling or Hugging Face directory (a fine-tuning run's output included), or a GGUF file"""
    data: Optional[str] = None
    """a prepared dataset directory, a .txt file, or a .json/.jsonl file of records"""
    tasks: Optional[str] = None
    """instead of --data: lm-eval task names, comma-separated (hellaswag,arc_easy, or your own in --tasks-dir)"""
    tasks_dir: Optional[str] = None
    """--tasks: a folder of your own lm-eval task YAML files (over local json/jsonl/csv files: offline)"""
    num_fewshot: Optional[int] = None
    """--tasks: examples shown before each question (default: each task's own)"""
    limit: Optional[float] = None
    """--tasks: at most this many documents per task (below 1: that fraction)"""
    log_samples: bool = False
    """--tasks: also write every scored sample, one JSONL file per task beside --out"""
    bootstrap_iters: int = 100000
    """--tasks: bootstrap resamples for the standard errors of non-mean metrics (0 = none)"""
    split: Literal["val", "train"] = "val"
    """which split of a dataset directory"""
    data_format: DataFormat = "auto"
    """format of a JSON/JSONL file (auto = detect from the first record)"""
    skip_bad_records: bool = False
    """skip malformed records (counted) instead of stopping at the first"""
    label_field: str = "label"
    """classifiers: the record field holding the label"""
    text_field: str = "text"
    """classifiers: the record field holding the text"""
    max_seq_len: Optional[int] = None
    """window / example length in tokens (default: the model's context length)"""
    batch_size: int = 8
    """sequences per forward pass"""
    max_tokens: Optional[int] = None
    """evaluate at most this many tokens of a text or dataset (default: all)"""
    device: str = "auto"
    """cuda, mps or cpu (auto picks the first available)"""
    precision: Literal["fp32", "bf16"] = "fp32"
    exact_match: bool = False
    """chat/instruction data: also answer each prompt greedily and report the share of answers
    equal to the reference reply"""
    max_new_tokens: int = 128
    """--exact-match: longest answer generated"""
    out: Optional[str] = None
    """also write the results to this JSON file (--tasks: lm-eval's results layout)"""


def _dataset_ids(path: Path, split: str, model_vocab: int, limit: int | None) -> list[int]:
    dataset = open_dataset(path)
    if dataset.meta["vocab_size"] > model_vocab:
        raise LingError(f"{path} was tokenized with a {dataset.meta['vocab_size']}-token vocabulary, larger than "
                        f"this model's {model_vocab}: it is not this model's data")
    return getattr(dataset, split)[:limit].tolist()


def _text_ids(texts: list[str], tokenizer) -> list[int]:
    """Documents as one stream, each followed by end-of-sequence (and one in front, so that the
    first token is predicted too)."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids = list(eos)
    for text in texts:
        ids += tokenizer.encode(text) + eos
    return ids


def _score_text(model, tokenizer, ids: list[int], args: EvalArgs, seq_len: int, pad: int, device, autocast) -> dict:
    windows = [Encoded(w[:-1], w[1:]) for w in text_windows(ids, seq_len) if len(w) > 1]
    if not windows:
        raise LingError(f"{args.data}: not enough text to evaluate (need at least 2 tokens)")
    n_bytes = len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
    batches = SFTBatches(windows, args.batch_size, pad, shuffle=False).fixed_batches()
    score = score_lm(model, tqdm(batches, desc="eval"), device, autocast)
    return {"task": "lm", "tokens": score.tokens, "bytes": n_bytes, "loss": score.loss,
            "perplexity": score.perplexity, "bits_per_byte": score.bits_per_byte(n_bytes)}


def _score_classifier(model, tokenizer, args: EvalArgs, seq_len: int, pad: int, device, autocast) -> dict:
    classifier = load_classifier(model, args.checkpoint).eval()
    records = read_examples(args.data, skip_bad_records=args.skip_bad_records, label_field=args.label_field,
                            text_field=args.text_field)
    classes = {label: i for i, label in enumerate(classifier.labels)}
    unknown = sorted({str(e.label) for e in records.examples if e.label not in classes})
    if unknown:
        raise LingError(f"{args.data}: label(s) {', '.join(unknown[:5])} are not classes of this model "
                        f"({', '.join(map(str, classifier.labels))})")
    examples = [encode_labelled(e, tokenizer, seq_len, classes) for e in records.examples]
    batches = SFTBatches(examples, args.batch_size, pad, shuffle=False).fixed_batches()
    loss, accuracy, n = score_classifier(classifier, tqdm(batches, desc="eval"), device, autocast)
    return {"task": "classification", "examples": n, "loss": loss, "accuracy": accuracy}


def _score_chat(model, tokenizer, records, args: EvalArgs, seq_len: int, pad: int, device, autocast) -> dict:
    if not tokenizer.chat_template:
        raise LingError(f"{args.checkpoint}: the tokenizer has no chat template, so chat/instruction data "
                        "cannot be formatted; evaluate text data, or a fine-tuned model")
    examples = [encode_example(e, tokenizer, seq_len) for e in records.examples]
    batches = SFTBatches(examples, args.batch_size, pad, shuffle=False).fixed_batches()
    score = score_lm(model, tqdm(batches, desc="eval"), device, autocast)
    scores = {"task": "sft", "examples": len(examples), "tokens": score.tokens, "loss": score.loss,
              "perplexity": score.perplexity}
    if args.exact_match:
        prompts = reply_prompts(records.examples, tokenizer, seq_len)
        scores["exact_match"], _ = answer_all(model, tokenizer, prompts, args.max_new_tokens, autocast, progress=True)
        scores["answered"] = len(prompts)
    return scores


def evaluate(args: EvalArgs) -> dict:
    if (args.data is None) == (args.tasks is None):
        raise LingError("ling eval needs --data FILE_OR_DIR (loss, perplexity, accuracy) or --tasks NAMES "
                        "(lm-eval benchmarks), one of the two")
    if args.tasks is not None:
        from ling.eval.tasks import run_tasks

        return run_tasks(args)
    device = pick_device(args.device)
    autocast = autocast_context(device.type, args.precision)
    data = Path(args.data)
    if not data.exists():
        raise LingError(f"{data}: no such file or directory")
    model, tokenizer = load_checkpoint(args.checkpoint, device=device)
    if tokenizer is None:
        raise LingError(f"{args.checkpoint}: no tokenizer.json; evaluation needs the model's tokenizer")
    model.eval()
    seq_len = args.max_seq_len or model.cfg.context_length
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    common = (args, seq_len, pad, device, autocast)
    if is_classifier_dir(args.checkpoint):
        scores = _score_classifier(model, tokenizer, *common)
    elif data.is_dir():
        scores = _score_text(model, tokenizer, _dataset_ids(data, args.split, model.cfg.vocab_size, args.max_tokens), *common)
    elif data.suffix == ".txt":
        scores = _score_text(model, tokenizer, _text_ids([data.read_text(encoding="utf-8")], tokenizer)[: args.max_tokens], *common)
    else:
        records = read_examples(data, args.data_format, args.skip_bad_records)
        if records.format == "text":
            scores = _score_text(model, tokenizer, _text_ids([e.text for e in records.examples], tokenizer)[: args.max_tokens], *common)
        else:
            scores = _score_chat(model, tokenizer, records, *common)
    results = {"checkpoint": args.checkpoint, "data": args.data, **scores}
    for key, value in results.items():
        print(f"{key:>14}: {value:.4f}" if isinstance(value, float) else f"{key:>14}: {value}")
    if args.out:
        with atomic_file(args.out) as f:
            f.write(json.dumps(results, indent=2) + "\n")
    return results
