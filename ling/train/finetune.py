"""`ling finetune`: fine-tuning of a pretrained model — full or LoRA; SFT, a task head or preferences.

No loop of its own: it prepares the three things a method changes and hands them to the
trainer core (`ling.train.trainer.Trainer`):

- which parameters train: all (`--method full`), or LoRA adapters and the rows of tokens the
  run adds (`--method lora`, base frozen and, in bf16 runs, held in bf16);
- how a batch is built: records → chat template → tokens (`ling.data.sft*`), padded or packed;
- which positions count: the assistant's replies (labels -100 elsewhere), every token with
  `--train-on-prompt` or for text, or each example's last token for `--task classification`;
- or, for `--task dpo`, the objective: preference pairs (`ling.data.preference*`, chosen and
  rejected in one forward) and a preference loss with its reference (`ling.train.preference`).

Around that: the base's tokenizer gets a chat template if it has none (saved with every
checkpoint, so `ling chat`/`serve` format prompts the same way), the validation loss is
measured before training and at every evaluation, a few held-out prompts are answered into
`RUN_DIR/samples.jsonl` each time, and `RUN_DIR/summary.json` records the outcome. A LoRA
checkpoint holds the adapter (ling's files and, when the base maps to a Hugging Face family,
PEFT's) instead of a full copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file

from ling.adapter_dir import ADAPTER_WEIGHTS, save_adapter
from ling.atomic import atomic_file
from ling.checkpoint import load_checkpoint, save_model_dir
from ling.data.preference import Pair, encode_pairs, read_pairs
from ling.data.preference_batches import PreferenceBatches
from ling.data.sft import DataFormat, Example, read_examples
from ling.data.sft_batches import SFTBatches
from ling.data.sft_encode import Encoded, encode_example, encode_labelled, install_chatml
from ling.dataclass_io import to_dict
from ling.device import pick_device, pick_precision
from ling.errors import LingError
from ling.eval.exact_match import greedy_reply, reply_prompts
from ling.eval.metrics import score_classifier
from ling.kernels import check_mode
from ling.lora import LoRAConfig, apply_lora, load_adapter_state_dict
from ling.model import autocast_context
from ling.tokenizer import Tokenizer
from ling.train import distributed
from ling.train.checkpointing import load_model_weights
from ling.train.config import TrainConfig
from ling.train.heads import SequenceClassifier, load_head_weights, save_head
from ling.train.preference import DPOConfig, PreferenceLoss, data_key, reference_logps
from ling.train.trainer import Trainer
from ling.vocab import resize_vocab


def _finetune_train_config() -> TrainConfig:
    return TrainConfig(max_steps=500, batch_tokens=4096, micro_batch=8, lr=1e-4, min_lr=1e-5, warmup_steps=20,
                       weight_decay=0.0, eval_every=50, eval_batches=20, log_every=10, keep_last=2)


@dataclass
class FinetuneArgs:
    """Fine-tune a pretrained model on instruction, chat, text, labelled or preference data (full or LoRA)."""

    base: str
    """the pretrained model: a ling checkpoint directory, a Hugging Face model directory or a GGUF file"""
    data: str
    """training data: .json/.jsonl in Alpaca, chat-messages, ShareGPT or {"text"} format; for --task dpo
    {"prompt", "chosen", "rejected"} as text or chat messages"""
    out: str
    """run directory: checkpoints/, latest, best, metrics.jsonl, samples.jsonl, config.yaml, report.png"""
    val_data: Optional[str] = None
    """validation data (same formats); default: hold out --val-fraction of --data"""
    method: Literal["full", "lora"] = "full"
    """full = train every weight; lora = train low-rank adapters, base frozen"""
    task: Literal["sft", "classification", "dpo"] = "sft"
    """sft = language modelling on the data; classification = a last-token class head; dpo = preference
    tuning on chosen/rejected pairs (the loss: --dpo.loss)"""
    data_format: DataFormat = "auto"
    """force the data format instead of detecting it from the first record (--task dpo: text or messages)"""
    skip_bad_records: bool = False
    """skip malformed records (counted in the summary) instead of stopping at the first"""
    label_field: str = "label"
    """classification: the record field holding the label"""
    text_field: str = "text"
    """classification: the record field holding the text"""
    max_seq_len: int = 512
    """examples are cut to this many tokens (at most the model's context length)"""
    pack: bool = False
    """put several examples in each sequence (no attention across them, positions restart)"""
    train_on_prompt: bool = False
    """count prompt tokens in the loss too (default: only the assistant's replies)"""
    val_fraction: float = 0.05
    """without --val-data: the share of --data held out for validation"""
    samples: int = 4
    """held-out prompts answered at every evaluation, into samples.jsonl"""
    sample_tokens: int = 64
    """at most this many tokens per sample answer"""
    dropout: Optional[float] = None
    """the model's dropout for this run (default: the base's own, 0 for --task dpo as in trl; short fine-tunes
    often do best with 0)"""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    train: TrainConfig = field(default_factory=_finetune_train_config)
    resume: Optional[str] = None
    """'auto' = continue from the newest complete checkpoint in --out; or a checkpoint directory"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"""
    kernels: str = "auto"
    """fast paths: auto = time the candidates on this machine and keep the fastest (the summary
    says which); reference = the plain model (ling/model.py) as it is"""

    def __post_init__(self):
        check_mode(self.kernels)


# ---- data -------------------------------------------------------------------------------
@dataclass
class PreparedData:
    train: list[Encoded]
    val: list[Encoded]
    val_examples: list[Example]
    skipped: list[str]
    truncated: int
    dropped: int
    """examples left with no trained token (e.g. the reply was cut off by --max-seq-len)"""
    classes: list | None
    new_token_ids: list[int]
    """tokens added to the tokenizer (the built-in chat template's)"""


def _split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    if not 0 < fraction < 1:
        raise LingError(f"--val-fraction must be between 0 and 1, got {fraction}")
    if len(examples) < 2:
        raise LingError("need at least 2 records to hold some out for validation; give --val-data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def _label_key(label) -> tuple:
    return (isinstance(label, str), label)


def _read_train_and_val(args: FinetuneArgs, read, field: str):
    """(the --data file's records, train items, validation items, skipped records): `read(path)`
    reads one file, whose `field` holds the items; validation is --val-data, else a seeded
    --val-fraction of --data."""
    train = read(args.data)
    if args.val_data:
        val = read(args.val_data)
        return train, getattr(train, field), getattr(val, field), list(train.skipped) + list(val.skipped)
    return train, *_split(getattr(train, field), args.val_fraction, args.train.seed), list(train.skipped)


def prepare_data(args: FinetuneArgs, tokenizer: Tokenizer, seq_len: int) -> PreparedData:
    """Read, split and encode the data; a tokenizer without a chat template gets the built-in
    one when the data holds conversations."""
    label_field = args.label_field if args.task == "classification" else None
    train_records, train_examples, val_examples, skipped = _read_train_and_val(
        args, lambda path: read_examples(path, args.data_format, args.skip_bad_records, label_field, args.text_field),
        "examples")
    classes = None
    if label_field is not None:
        classes = sorted({e.label for e in train_examples}, key=_label_key)
        unseen = sorted({str(e.label) for e in val_examples} - {str(c) for c in classes})
        if len(classes) < 2:
            raise LingError(f"{args.data}: classification needs at least 2 classes, found {classes}")
        if unseen:
            raise LingError(f"validation labels {', '.join(unseen[:5])} never occur in the training data")
    new_token_ids = []
    if label_field is None and not tokenizer.chat_template and train_records.format != "text":
        new_token_ids = install_chatml(tokenizer)
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        encode = lambda e: encode_labelled(e, tokenizer, seq_len, index)
    else:
        encode = lambda e: encode_example(e, tokenizer, seq_len, args.train_on_prompt)
    def encode_at(example: Example) -> Encoded:
        try:
            return encode(example)
        except LingError as e:  # e.g. a character a char-level tokenizer does not know
            raise LingError(f"{example.where}: {e}") from None

    encoded = {"train": [encode_at(e) for e in train_examples], "val": [encode_at(e) for e in val_examples]}
    truncated = sum(e.truncated for split in encoded.values() for e in split)
    kept = {k: [e for e in v if e.n_trained] for k, v in encoded.items()}
    dropped = sum(len(encoded[k]) - len(kept[k]) for k in encoded)
    for split, examples in kept.items():
        if not examples:
            raise LingError(f"no {split} example has a token to learn from within --max-seq-len {seq_len}; "
                            "raise --max-seq-len")
    return PreparedData(kept["train"], kept["val"], val_examples, skipped, truncated, dropped, classes, new_token_ids)


def prepare_pairs(args: FinetuneArgs, tokenizer: Tokenizer, seq_len: int) -> PreparedData:
    """--task dpo: read, split and encode preference pairs (train pairs first, then validation,
    numbered in that order: their rows of the reference log-probability table)."""
    if args.pack:
        raise LingError("--pack does not apply to --task dpo (each pair is its own two rows)")
    _, train_pairs, val_pairs, skipped = _read_train_and_val(
        args, lambda path: read_pairs(path, args.data_format, args.skip_bad_records), "pairs")
    new_token_ids = []
    if not tokenizer.chat_template and any(p.is_chat for p in train_pairs + val_pairs):
        new_token_ids = install_chatml(tokenizer)
    train = encode_pairs(train_pairs, tokenizer, seq_len, args.skip_bad_records, skipped)
    val = encode_pairs(val_pairs, tokenizer, seq_len, args.skip_bad_records, skipped, first_index=len(train))
    for split, pairs in (("train", train), ("validation", val)):
        if not pairs:
            raise LingError(f"no usable {split} pair is left ({len(skipped)} bad record(s) skipped, first: "
                            f"{skipped[0] if skipped else '-'})")
    kept = {p.where for p in val}
    return PreparedData(train, val, [p for p in val_pairs if p.where in kept], skipped,
                        sum(p.truncated for p in train + val), 0, None, new_token_ids)


# ---- saving and restoring what trains ------------------------------------------------------
@dataclass
class Saver:
    """The trainer's save/load hooks: full weights, or an adapter; plus a task head."""

    method: str
    lora: LoRAConfig
    base: str
    new_token_ids: list[int]
    classifier: bool
    peft_skipped: str | None = None
    """why no PEFT files were written (the base matches no Hugging Face family)"""

    def _body(self, model):
        return model.body if self.classifier else model

    def save(self, model, tokenizer: Tokenizer, directory: Path) -> None:
        body = self._body(model)
        if self.method == "lora":
            save_adapter(body, self.lora, directory, self.base, self.new_token_ids)
            tokenizer.save(directory)
            if not self.classifier:
                self._save_peft(body, directory)
        else:
            save_model_dir(body, tokenizer, directory)
        if self.classifier:
            save_head(model, directory)

    def _save_peft(self, body, directory: Path) -> None:
        from ling.hf.peft import save_peft_adapter

        try:
            save_peft_adapter(body, self.lora, directory, self.base)
        except LingError as e:  # a native model shape no HF family has
            self.peft_skipped = str(e)

    def load(self, model, directory: Path) -> None:
        body = self._body(model)
        if self.method == "lora":
            load_adapter_state_dict(body, load_file(str(directory / ADAPTER_WEIGHTS)), str(directory))
        else:
            load_model_weights(body, directory)
        if self.classifier:
            load_head_weights(model, directory)


# ---- samples ------------------------------------------------------------------------------
def _sample_prompts(examples: list[Example], tokenizer: Tokenizer, n: int, seq_len: int) -> list[dict]:
    """Up to `n` held-out prompts: conversations up to their last reply (the reference), or for
    text data the first half of a text (no reference)."""
    if examples and examples[0].messages is None:
        prompts = []
        for example in examples[:n]:
            ids = tokenizer.encode(example.text)
            ids = ids[: max(1, min(len(ids) // 2, 64, seq_len - 1))]
            prompts.append({"prompt": tokenizer.decode(ids), "ids": ids, "reference": None})
        return prompts
    return reply_prompts(examples[:n], tokenizer, seq_len)


def _pair_prompts(pairs: list[Pair], tokenizer: Tokenizer, n: int, seq_len: int) -> list[dict]:
    """Up to `n` held-out preference prompts, with the chosen completion as the reference."""
    chats = [Example(p.where, messages=p.prompt + p.chosen) for p in pairs[:n] if p.is_chat]
    if chats:
        return reply_prompts(chats, tokenizer, seq_len)
    prompts = [{"prompt": p.prompt, "ids": tokenizer.encode(p.prompt), "reference": p.chosen} for p in pairs[:n]]
    return [p for p in prompts if 0 < len(p["ids"]) < seq_len]


def sample_hook(tokenizer: Tokenizer, prompts: list[dict], args: FinetuneArgs, device, precision: str):
    """After each evaluation: answer the held-out prompts greedily, append them to samples.jsonl,
    and report the exact-match rate against the references."""
    path = Path(args.out) / "samples.jsonl"
    autocast = autocast_context(device.type, precision)

    def on_eval(step: int, model) -> dict:
        if not prompts:
            return {}
        rows = []
        for p in prompts:
            answer = greedy_reply(model, tokenizer, p["ids"], args.sample_tokens, autocast)
            rows.append({"step": step, "prompt": p["prompt"], "reference": p["reference"], "answer": answer})
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        judged = [r for r in rows if r["reference"] is not None]
        if not judged:
            return {}
        return {"sample_exact_match": sum(r["answer"].strip() == r["reference"].strip() for r in judged) / len(judged)}

    return on_eval


def accuracy_hook(val_batches, device, precision: str):
    def on_eval(step: int, model) -> dict:
        _, accuracy, _ = score_classifier(model, val_batches, device, autocast_context(device.type, precision))
        model.train()
        return {"val_accuracy": accuracy}

    return on_eval


# ---- the command --------------------------------------------------------------------------
def finetune(args: FinetuneArgs) -> int:
    result, _ = run_finetune(args)
    return 130 if result.interrupted else 0


def run_finetune(args: FinetuneArgs, show_summary: bool = True, after_eval=None):
    """The whole command; returns (TrainResult, summary dict) for callers such as benchmarks.
    `after_eval` goes to the trainer (`Trainer.after_eval`: e.g. `ling sweep`'s pruning)."""
    if args.max_seq_len < 2:
        raise LingError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise LingError(f"--dropout must be in [0, 1), got {args.dropout}")
    device = pick_device(args.device)
    dist = distributed.init_distributed(device.type, args.train.parallel)
    try:
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        precision = pick_precision(args.train.precision, device)
        # Trained weights stay fp32; a frozen LoRA base only needs the compute precision.
        frozen_bf16 = args.method == "lora" and precision == "bf16"
        model, tokenizer = load_checkpoint(args.base, device=device, dtype="bf16" if frozen_bf16 else "fp32")
        if tokenizer is None:
            raise LingError(f"{args.base}: no tokenizer.json; fine-tuning needs the base model's tokenizer")
        seq_len = min(args.max_seq_len, model.cfg.context_length)
        dpo = args.task == "dpo"
        data = prepare_pairs(args, tokenizer, seq_len) if dpo else prepare_data(args, tokenizer, seq_len)
        resize_vocab(model, tokenizer.vocab_size)
        if args.dropout is not None or dpo:  # trl's disable_dropout: policy and reference see the same network
            model.set_dropout(args.dropout or 0.0)
        torch.manual_seed(args.train.seed)  # the same new weights (adapters, head) in every run and process
        if args.method == "lora":
            apply_lora(model, args.lora, data.new_token_ids)
        if args.task == "classification":
            model = SequenceClassifier(model, data.classes)
        model.to(device)

        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        Batches = PreferenceBatches if dpo else SFTBatches
        batches = Batches(data.train, args.train.micro_batch, pad, seed=args.train.seed, pack=args.pack,
                          seq_len=seq_len, accumulation=args.train.accumulation(seq_len, dist.world_size),
                          rank=dist.rank, world_size=dist.world_size)
        val_all = Batches(data.val, args.train.micro_batch, pad, pack=args.pack, seq_len=seq_len, shuffle=False)
        val_mine = Batches(data.val, args.train.micro_batch, pad, pack=args.pack, seq_len=seq_len, shuffle=False,
                           rank=dist.rank, world_size=dist.world_size)
        loss = None
        if dpo:
            reference = "none" if not args.dpo.needs_reference else "adapters" if args.method == "lora" else "table"
            loss = PreferenceLoss(args.dpo, reference, model)
        if args.task == "classification":
            on_eval = accuracy_hook(val_all.fixed_batches(), device, precision)
        elif dpo:
            prompts = _pair_prompts(data.val_examples, tokenizer, args.samples, seq_len)
            on_eval = sample_hook(tokenizer, prompts, args, device, precision)
        else:
            prompts = _sample_prompts(data.val_examples, tokenizer, args.samples, seq_len)
            on_eval = sample_hook(tokenizer, prompts, args, device, precision)
        saver = Saver(args.method, args.lora, str(Path(args.base).resolve()), data.new_token_ids,
                      args.task == "classification")
        resolved = dataclasses.replace(args, device=str(device), train=dataclasses.replace(args.train, precision=precision))
        trainer = Trainer(
            model, resolved.train, batches, val_mine.fixed_batches(args.train.eval_batches), args.out,
            device=device, precision=precision, tokenizer=tokenizer, dist=dist,
            flops_per_token=model.cfg.flops_per_token(seq_len),
            save_weights=saver.save, load_weights=saver.load, config=to_dict(resolved), on_eval=on_eval,
            after_eval=after_eval,
            resume_hint=f"ling finetune --config {Path(args.out) / 'config.yaml'} --resume auto", kernels=args.kernels,
            **({"loss_fn": loss, "loss_metrics": loss.metrics} if loss is not None else {}),
        )
        if loss is not None and loss.reference == "table":
            # Full fine-tuning: the reference is the base as it is now, once for every pair (cached in --out).
            pairs = data.train + data.val
            every_pair = PreferenceBatches(pairs, args.train.micro_batch, pad, shuffle=False).fixed_batches()
            key = data_key(every_pair, str(Path(args.base).resolve()), precision)
            loss.table = reference_logps(trainer.eval_model, every_pair, len(pairs), Path(args.out), key, device,
                                         precision, write=dist.is_main)
        trainable = sum(p.numel() for p in trainer.params)
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        base_val_loss = trainer.evaluate()
        if dist.is_main:
            task = f"dpo, {args.dpo.loss} loss, β {args.dpo.beta:g}" if dpo else args.task
            print(f"{args.method} fine-tuning ({task}): {trainable:,} of {total:,} parameters train "
                  f"({trainable / total:.2%}) · {len(data.train):,} train / {len(data.val):,} val "
                  + ("pairs" if dpo else
                     f"examples in {len(batches.rows):,} sequences{' (packed)' if args.pack else ''}")
                  + f" · {precision} on {device} · val loss before training {base_val_loss:.4f}", file=sys.stderr)
        result = trainer.fit(args.resume, baseline_val_loss=base_val_loss)
        summary = {
            "method": args.method, "task": args.task, "trainable_params": trainable, "total_params": total,
            "train_examples": len(data.train), "val_examples": len(data.val), "sequences": len(batches.rows),
            "truncated": data.truncated, "dropped": data.dropped, "skipped_records": len(data.skipped),
            "base_val_loss": base_val_loss, "final_val_loss": result.final_val_loss,
            "best_val_loss": result.best_val_loss, "steps": result.step, "seconds": result.seconds,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None, "peft_skipped": saver.peft_skipped,
            "kernels": trainer.kernels.to_dict(),
        }
        if dpo:
            summary.update({"dpo_loss": args.dpo.loss, "beta": args.dpo.beta, "val_rewards": trainer.last_eval_metrics})
        if dist.is_main:
            with atomic_file(Path(args.out) / "summary.json") as f:
                f.write(json.dumps(summary, indent=2) + "\n")
        if show_summary and dist.is_main and not result.interrupted:
            print_summary(summary, data, Path(args.out))
            print(trainer.kernels.summary())
        return result, summary
    finally:
        distributed.shutdown(dist)


def print_summary(summary: dict, data: PreparedData, run_dir: Path) -> None:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"
    lines = [
        f"\ndone: {summary['steps']} steps in {summary['seconds']:.0f} s · {summary['method']} · "
        f"{summary['trainable_params']:,} trainable parameters",
        f"val loss {fmt(summary['base_val_loss'])} (base) → {fmt(summary['final_val_loss'])} "
        f"(best {fmt(summary['best_val_loss'])})",
        f"data: {summary['train_examples']:,} train / {summary['val_examples']:,} val examples · "
        f"{summary['truncated']} truncated at --max-seq-len · {summary['dropped']} without a token to learn dropped · "
        f"{summary['skipped_records']} bad records skipped",
    ]
    if summary.get("val_rewards"):
        r = summary["val_rewards"]
        lines.append(f"val rewards: accuracy {r['rewards/accuracies']:.1%} · margin {r['rewards/margins']:.4f} · "
                     f"chosen {r['rewards/chosen']:.4f} · rejected {r['rewards/rejected']:.4f}")
    if data.skipped:
        lines.append(f"first skipped: {data.skipped[0]}")
    lines.append(f"model: {run_dir / 'latest'} (try: ling chat {run_dir / 'latest'})")
    if summary["peft_skipped"]:
        lines.append(f"no PEFT adapter files: {summary['peft_skipped']}")
    lines.append(f"samples: {run_dir / 'samples.jsonl'} · metrics: {run_dir / 'metrics.jsonl'} · "
                 f"report: {run_dir / 'report.png'}")
    print("\n".join(lines))
