"""Does preference tuning teach a preference? DPO from an undecided SFT model, full and LoRA; its memory.

    PYTHONPATH=$PWD python benchmarks/bench_dpo.py                 # both parts
    PYTHONPATH=$PWD python benchmarks/bench_dpo.py --skip-memory

1. An SFT model that is undecided: a small Llama-style char model, `ling finetune --task sft`
   from random weights on `ling.data.synthetic`'s echo task (repeat a word) whose answers are
   UPPER or lower case at random — meant to prefer the UPPER answer on about half of the
   held-out prompts (measured: the first row of the table).
2. `ling finetune --task dpo` from it, `--method full` and `--method lora`, on pairs of other
   prompts (chosen: UPPER, rejected: lower). Measured on held-out pairs: the reward accuracy
   (`rewards/accuracies` of the last evaluation; for the SFT model, the share of pairs whose
   chosen answer has the higher log-probability) and the share of greedy answers in the chosen
   style. Time per optimizer step (median over the run's steps, from metrics.jsonl) against
   the SFT run's at the same 16 sequences per step (8 pairs).
3. Memory: a larger random-weight base (memory does not depend on the values), a few steps of
   LoRA-SFT on the chosen conversations and of LoRA-DPO on the pairs, the same number of
   sequences per forward in both (--mem-pairs pairs = twice as many SFT sequences); the peak RSS of each process (the reference is the base with adapters off: no
   second model), and the time per step.

Every stage is a real `ling` command in its own process (its peak RSS is its own) and is
skipped when its output already exists in --workdir (the memory runs are measured afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.machine import describe, header
from ling.checkpoint import load_checkpoint, save_model_dir
from ling.config import ModelConfig
from ling.data.preference import encode_pair, read_pairs
from ling.data.preference_batches import collate_pairs
from ling.data.sft import Example
from ling.data.synthetic import answer_style, held_out_split, make_examples, mixed_styles, write_jsonl
from ling.eval.exact_match import answer_all, reply_prompts
from ling.model import autocast_context, build_model
from ling.tokenizer import Tokenizer
from ling.train.preference import completion_logps

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!\n"
SEQ = 64
SMALL = dict(context_length=SEQ, n_layer=2, n_embd=96, n_head=4, position="rope", norm="rmsnorm", mlp="swiglu",
             mlp_hidden=256, dropout=0.0)
LARGE = dict(context_length=SEQ, n_layer=12, n_embd=576, n_head=9, position="rope", norm="rmsnorm", mlp="swiglu",
             mlp_hidden=1536, dropout=0.0)
"""the memory part's base: 12 layers of 576 (about 48M parameters), so that a second copy of it would show"""
COMMON = ["--max-seq-len", str(SEQ), "--train.log-every", "1", "--kernels", "reference", "--samples", "0"]


def run(cmd: list[str], log: Path) -> dict:
    """Run a `ling` command; its wall time and peak RSS (from wait4, this child alone)."""
    print("$ ling " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ling", *cmd], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: ling {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss / 1024}


def random_base(path: Path, cfg: dict) -> Path:
    if not path.exists():
        tokenizer = Tokenizer.train_char([ALPHABET])
        torch.manual_seed(0)
        save_model_dir(build_model(ModelConfig(**cfg, vocab_size=tokenizer.vocab_size)), tokenizer, path)
    return path


def step_seconds(run_dir: Path) -> float:
    """Median seconds per optimizer step (log_every 1: each train line's window is one step)."""
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    per_step = [(b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip(train, train[1:])]
    return statistics.median(per_step)


def finetune(out: Path, cmd: list[str]) -> dict:
    if not (out / "summary.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        (out.parent / f"{out.name}.json").write_text(json.dumps(run(["finetune", "--out", str(out), *cmd, *COMMON],
                                                                    out.parent / f"{out.name}.log")))
    stats = json.loads((out.parent / f"{out.name}.json").read_text())
    return {**stats, "summary": json.loads((out / "summary.json").read_text()), "step_s": step_seconds(out)}


@torch.no_grad()
def judge(model_dir: Path, held_out: Path, n_answers: int) -> dict:
    """On held-out pairs: the share whose chosen completion is likelier than the rejected one,
    and the share of greedy answers in the chosen style."""
    model, tokenizer = load_checkpoint(model_dir)
    model.eval()
    pairs = read_pairs(held_out).pairs
    encoded = [encode_pair(p, tokenizer, SEQ, i) for i, p in enumerate(pairs)]
    prefers = []
    for i in range(0, len(encoded), 32):
        logps, _ = completion_logps(model, collate_pairs(encoded[i:i + 32], tokenizer.pad_id or 0))
        prefers += (logps[:, 0] > logps[:, 1]).tolist()
    prompts = reply_prompts([Example(p.where, messages=p.prompt + p.chosen) for p in pairs[:n_answers]], tokenizer, SEQ)
    _, rows = answer_all(model, tokenizer, prompts, 12, autocast_context("cpu", "fp32"))
    return {"prefers_chosen": sum(prefers) / len(prefers),
            "chosen_style": sum(answer_style(r["answer"]) == "chosen" for r in rows) / len(rows),
            "rejected_style": sum(answer_style(r["answer"]) == "rejected" for r in rows) / len(rows),
            "examples": [r["answer"] for r in rows[:5]]}


def accuracy_part(work: Path, args) -> dict:
    base = random_base(work / "base-random", SMALL)
    sft_data, sft_val = work / "sft-train.jsonl", work / "sft-val.jsonl"
    dpo_data, held_out = work / "dpo-train.jsonl", work / "dpo-held-out.jsonl"
    if not held_out.exists():
        records = make_examples("echo", args.n_sft + args.n_pairs + args.n_held_out)
        rest, held = held_out_split(records, args.n_held_out)
        sft, pairs = rest[:args.n_sft], rest[args.n_sft:]
        write_jsonl(mixed_styles(sft[:-100]), sft_data, "messages")  # distinct prompts in every file
        write_jsonl(mixed_styles(sft[-100:], seed=1), sft_val, "messages")
        write_jsonl(pairs, dpo_data, "preference")
        write_jsonl(held, held_out, "preference")
    results = {"sft": finetune(work / "sft", [
        "--base", str(base), "--data", str(sft_data), "--val-data", str(sft_val), "--method", "full",
        "--train.micro-batch", "16", "--train.batch-tokens", str(16 * SEQ), "--train.max-steps", str(args.sft_steps),
        "--train.lr", "3e-3", "--train.min-lr", "3e-4", "--train.warmup-steps", "50", "--train.weight-decay", "0.0",
        "--train.eval-every", str(args.sft_steps // 2), "--train.eval-batches", "4"])}
    sft_model = work / "sft" / "latest"
    results["sft"]["judged"] = judge(sft_model, held_out, args.n_answers)
    settings = {"full": (args.full_lr, []), "lora": (args.lora_lr, ["--lora.rank", "8", "--lora.alpha", "16"])}
    for method in args.methods.split(","):
        lr, extra = settings[method]
        run_dir = work / f"dpo-{method}"
        r = finetune(run_dir, [
            "--task", "dpo", "--base", str(sft_model), "--data", str(dpo_data), "--val-data", str(held_out),
            "--method", method, "--dpo.beta", str(args.beta), "--train.micro-batch", "8",
            "--train.batch-tokens", str(8 * SEQ), "--train.max-steps", str(args.dpo_steps), "--train.lr", str(lr),
            "--train.min-lr", str(lr / 10), "--train.warmup-steps", "10", "--train.eval-every", str(args.dpo_steps // 4),
            "--train.eval-batches", "25", *extra])
        r["judged"] = judge(run_dir / "latest", held_out, args.n_answers)
        results[f"dpo-{method}"] = r
        print(json.dumps({method: {k: v for k, v in r.items() if k != "summary"}}, indent=2), flush=True)
    return results


def memory_part(work: Path, args) -> dict:
    base = random_base(work / "base-large", LARGE)
    pairs, chats = work / "mem-pairs.jsonl", work / "mem-chosen.jsonl"
    if not pairs.exists():
        records = make_examples("echo", 400, seed=7)
        write_jsonl(records, pairs, "preference")
        write_jsonl([{**r, "output": r["output"].upper()} for r in records], chats, "messages")
    results = {}
    n = args.mem_pairs
    for name, flags in (("lora-sft", ["--data", str(chats), "--train.micro-batch", str(2 * n),
                                      "--train.batch-tokens", str(2 * n * SEQ)]),
                        ("lora-dpo", ["--task", "dpo", "--data", str(pairs), "--train.micro-batch", str(n),
                                      "--train.batch-tokens", str(n * SEQ)])):
        out = work / f"mem-{name}"
        shutil.rmtree(out, ignore_errors=True)  # measured afresh every time
        results[name] = finetune(out, ["--base", str(base), "--method", "lora", *flags, "--train.max-steps",
                                       str(args.mem_steps), "--train.eval-every", str(args.mem_steps),
                                       "--train.eval-batches", "1", "--train.keep-last", "1"])
    results["dpo_over_sft_rss"] = results["lora-dpo"]["peak_rss_mb"] / results["lora-sft"]["peak_rss_mb"]
    results["dpo_over_sft_step"] = results["lora-dpo"]["step_s"] / results["lora-sft"]["step_s"]
    results["total_params"] = results["lora-sft"]["summary"]["total_params"]
    results["pairs"] = args.mem_pairs
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2), flush=True)
    return results


def markdown(results: dict, machine: dict) -> str:
    lines = [header(machine), "", "Command: `PYTHONPATH=$PWD python benchmarks/bench_dpo.py`", ""]
    if "accuracy" in results:
        a = results["accuracy"]
        lines += ["| model | held-out reward accuracy | greedy answers in the chosen style (other style) | s / step | "
                  "trainable parameters | minutes |", "|---|---|---|---|---|---|"]
        for name, label in (("sft", "SFT (mixed styles), the start"), ("dpo-full", "DPO, full"), ("dpo-lora", "DPO, LoRA r 8")):
            if name not in a:
                continue
            r = a[name]
            accuracy = (r["summary"]["val_rewards"]["rewards/accuracies"] if name != "sft" else r["judged"]["prefers_chosen"])
            lines.append(f"| {label} | {accuracy:.1%} | {r['judged']['chosen_style']:.1%} "
                         f"({r['judged']['rejected_style']:.1%}) | {r['step_s']:.3f} | "
                         f"{r['summary']['trainable_params']:,} | {r['seconds'] / 60:.1f} |")
    if "memory" in results:
        m = results["memory"]
        lines += ["", f"| {m['total_params'] / 1e6:.0f}M-parameter base, LoRA r 8, {2 * m['pairs']} sequences × ≤ {SEQ} "
                  "tokens per step | "
                  "peak RSS | s / step |", "|---|---|---|"]
        for name in ("lora-sft", "lora-dpo"):
            lines.append(f"| {name} | {m[name]['peak_rss_mb']:,.0f} MB | {m[name]['step_s']:.2f} |")
        lines.append(f"\nLoRA-DPO / LoRA-SFT: peak RSS **{m['dpo_over_sft_rss']:.2f}×**, time per step "
                     f"{m['dpo_over_sft_step']:.2f}×")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/ling-bench-dpo")
    parser.add_argument("--n-sft", type=int, default=3000)
    parser.add_argument("--n-pairs", type=int, default=800)
    parser.add_argument("--n-held-out", type=int, default=200)
    parser.add_argument("--n-answers", type=int, default=100, help="held-out prompts answered greedily")
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--dpo-steps", type=int, default=80)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--full-lr", type=float, default=5e-4)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--mem-pairs", type=int, default=2, help="pairs per step in the memory part (2 × sequences)")
    parser.add_argument("--methods", default="full,lora", help="the DPO runs of the accuracy part")
    parser.add_argument("--results", default=None, help="JSON results file (default: WORKDIR/results.json)")
    parser.add_argument("--merge", nargs="+", help="print the Markdown of these results files together, and exit")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-memory", action="store_true")
    args = parser.parse_args()
    if args.merge:  # parts run apart (e.g. in parallel): one table
        parts = [json.loads(Path(path).read_text()) for path in args.merge]
        merged = {"machine": parts[0]["machine"], "accuracy": {}}
        for part in parts:
            merged["accuracy"].update(part.get("accuracy", {}))
            merged.update({"memory": part["memory"]} if "memory" in part else {})
        merged = {k: v for k, v in merged.items() if v}
        return print(markdown(merged, merged["machine"]))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    machine = describe(torch.get_num_threads())
    results = {"machine": machine}
    if not args.only_memory:
        results["accuracy"] = accuracy_part(work, args)
    if not args.skip_memory:
        results["memory"] = memory_part(work, args)
    Path(args.results or work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + markdown(results, machine))


if __name__ == "__main__":
    main()
