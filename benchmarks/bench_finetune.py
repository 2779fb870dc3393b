"""Does fine-tuning teach? Full vs LoRA on synthetic tasks, and LoRA's memory on a 110M base.

    PYTHONPATH=$PWD python benchmarks/bench_finetune.py                  # add and reverse, memory (~35 min on 2 quiet cores)
    PYTHONPATH=$PWD python benchmarks/bench_finetune.py --tasks sort --steps 1500 --skip-memory
    PYTHONPATH=$PWD python benchmarks/bench_finetune.py --skip-memory    # only the accuracy part
    PYTHONPATH=$PWD python benchmarks/bench_finetune.py --only-memory

1. Base: `ling prepare` (char tokenizer) on tinyshakespeare + CPython's doc topics (for digits
   and symbols), then `ling pretrain` of a small Llama-style model.
2. For each task of --tasks (reverse a word, sort its letters, add two 2-digit numbers): exact-match
   accuracy on held-out prompts of the base, asked in the same chat format, then after
   `ling finetune --method full` and after `--method lora` on the same base and data
   (measured with `ling eval --exact-match`). Minutes, trainable parameters and the peak RSS
   of each fine-tuning process are recorded.
3. Memory: a llama-110m base (random weights: memory does not depend on their values; a
   32k BPE vocabulary), a few steps of full fine-tuning and of LoRA, peak RSS of each process;
   side by side, the peer a user would pick — transformers + PEFT on `ling convert to-hf` of
   the same base, a plain loop (AdamW, bf16 autocast) over the same batch shape.

Every stage is a real `ling` command in its own process (so its peak RSS is its own) and is
skipped when its output already exists in --workdir. Results go to --results (JSON) and are
printed as the Markdown table of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from ling.checkpoint import load_checkpoint, save_model_dir
from ling.config import ModelConfig
from ling.data.sft import read_examples
from ling.data.sft_encode import install_chatml
from ling.data.synthetic import MAX_DISTINCT, TASKS, held_out_split, make_examples, write_jsonl
from ling.eval.exact_match import answer_all, reply_prompts
from ling.model import autocast_context, build_model
from ling.tokenizer import Tokenizer
from ling.vocab import resize_vocab

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
BASE_MODEL = ["--model.name", "custom", "--model.context-length", "128", "--model.n-layer", "4", "--model.n-embd", "256",
              "--model.n-head", "8", "--model.position", "rope", "--model.norm", "rmsnorm", "--model.mlp", "swiglu",
              "--model.mlp-hidden", "688", "--model.dropout", "0"]
"""A 3.2M-parameter Llama-style char model (RoPE, RMSNorm, SwiGLU, 8 heads of 32), pretrained
the way configs/shakespeare-char-cpu.yaml is: many small steps at a high learning rate. It
exports to HF as LlamaForCausalLM, so its LoRA adapter is also a PEFT adapter."""


def run(cmd: list[str], log: Path) -> dict:
    """Run a `ling` command; its wall time and peak RSS (from wait4, this child alone)."""
    print("$ ling " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ling", *cmd], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: ling {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def base_model(work: Path, pretrain_steps: int) -> Path:
    data, run_dir = work / "data", work / "base"
    if not data.exists():
        run(["prepare", "--output", str(data), "--tokenizer", "char", "--input", SHAKESPEARE, "--builtin"],
            work / "prepare.log")
    if not (run_dir / "latest").exists():
        run(["pretrain", "--data", str(data), "--out", str(run_dir), *BASE_MODEL, "--train.max-steps", str(pretrain_steps),
             "--train.batch-tokens", "2048", "--train.micro-batch", "16", "--train.lr", "3e-3", "--train.min-lr", "3e-4",
             "--train.warmup-steps", "100", "--train.weight-decay", "0.1", "--train.beta2", "0.95",
             "--train.eval-every", "500", "--train.eval-batches", "20"], work / "pretrain.log")
    return run_dir / "latest"


def base_accuracy(base: Path, held_out: Path) -> float:
    """The base model asked the held-out prompts in the chat format fine-tuning will use."""
    model, tokenizer = load_checkpoint(base)
    if not tokenizer.chat_template:
        install_chatml(tokenizer)
        resize_vocab(model, tokenizer.vocab_size)
    prompts = reply_prompts(read_examples(held_out).examples, tokenizer, model.cfg.context_length)
    accuracy, _ = answer_all(model.eval(), tokenizer, prompts, 16, autocast_context("cpu", "fp32"))
    return accuracy


def finetune(base: Path, train: Path, held_out: Path, out: Path, method: str, args) -> dict:
    if not (out / "summary.json").exists():
        extra = ["--train.lr", str(args.full_lr)] if method == "full" else [
            "--train.lr", str(args.lora_lr), "--lora.rank", str(args.lora_rank), "--lora.alpha", str(2 * args.lora_rank)]
        stats = run(["finetune", "--base", str(base), "--data", str(train), "--val-data", str(held_out), "--out", str(out),
                     "--method", method, "--pack", "--max-seq-len", "128", "--train.batch-tokens", "2048",
                     "--train.micro-batch", "16", "--dropout", "0", "--train.max-steps", str(args.steps), "--train.warmup-steps", "30",
                     "--train.min-lr", "1e-4", "--train.eval-every", str(max(1, args.steps // 4)),
                     "--train.eval-batches", "5", "--samples", "20", "--sample-tokens", "12", *extra],
                    out.parent / f"{out.name}.log")
        (out / "bench.json").write_text(json.dumps(stats))
    summary = json.loads((out / "summary.json").read_text())
    result_file = out / "eval.json"
    if not result_file.exists():
        run(["eval", str(out / "latest"), "--data", str(held_out), "--exact-match", "--max-new-tokens", "16",
             "--out", str(result_file)], out.parent / f"{out.name}-eval.log")
    stats = json.loads((out / "bench.json").read_text())
    return {"accuracy": json.loads(result_file.read_text())["exact_match"], "minutes": stats["seconds"] / 60,
            "peak_rss_mb": stats["peak_rss_mb"], "trainable_params": summary["trainable_params"],
            "val_loss": summary["final_val_loss"]}


def accuracy_part(work: Path, args) -> dict:
    base = base_model(work, args.pretrain_steps)
    results = {}
    for task in args.tasks:
        train, held_out = work / f"{task}-train.jsonl", work / f"{task}-held-out.jsonl"
        if not held_out.exists():
            n = min(args.n_train + args.n_held_out, MAX_DISTINCT.get(task, 1 << 62))  # `add` has 8,100 prompts in all
            train_records, held_records = held_out_split(make_examples(task, n), args.n_held_out)
            write_jsonl(train_records, train, "messages")
            write_jsonl(held_records, held_out, "messages")
        results[task] = {"base": base_accuracy(base, held_out)}
        for method in ("full", "lora"):
            results[task][method] = finetune(base, train, held_out, work / f"{task}-{method}", method, args)
        print(json.dumps({task: results[task]}, indent=2), flush=True)
    return results


MEM_STEPS, MEM_BATCH, MEM_SEQ = 3, 8, 128


def hf_peer(hf_dir: str, method: str) -> None:
    """transformers + PEFT, a plain training loop: what the memory part compares against."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if method == "lora" else torch.float32  # a frozen base need not be fp32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    tokens = torch.randint(0, model.config.vocab_size, (MEM_BATCH, MEM_SEQ))
    for _ in range(MEM_STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_peer(hf_dir: Path, method: str, log: Path) -> dict:
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--hf-peer", method, "--workdir", str(hf_dir)],
                                stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: transformers peer ({method})\n{log.read_text()[-3000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss / 1024}


def memory_part(work: Path, args) -> dict:
    base = work / "llama-110m"
    if not base.exists():
        tokenizer = Tokenizer.train_bpe([Path(SHAKESPEARE).read_text()], vocab_size=32000)
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_name("llama-110m", vocab_size=32000))
        save_model_dir(model, tokenizer, base)
    if not (work / "llama-110m-hf").exists():
        run(["convert", "to-hf", str(base), str(work / "llama-110m-hf")], work / "to-hf.log")
    data = work / "reverse-train.jsonl"
    if not data.exists():
        write_jsonl(make_examples("reverse", 500), data, "messages")
    results = {}
    for method in ("full", "lora"):
        out = work / f"mem-{method}"
        shutil.rmtree(out, ignore_errors=True)  # measured afresh every time
        stats = run(["finetune", "--base", str(base), "--data", str(data), "--out", str(out), "--method", method,
                     "--max-seq-len", str(MEM_SEQ), "--train.micro-batch", str(MEM_BATCH),
                     "--train.batch-tokens", str(MEM_BATCH * MEM_SEQ), "--train.max-steps", str(MEM_STEPS),
                     "--train.eval-every", str(MEM_STEPS), "--train.eval-batches", "1", "--samples", "0",
                     "--train.keep-last", "1"], work / f"mem-{method}.log")
        summary = json.loads((out / "summary.json").read_text())
        results[method] = {**stats, "trainable_params": summary["trainable_params"], "total_params": summary["total_params"]}
        results[f"hf-{method}"] = run_peer(work / "llama-110m-hf", method, work / f"mem-hf-{method}.log")
    results["lora_over_full"] = results["lora"]["peak_rss_mb"] / results["full"]["peak_rss_mb"]
    results["hf_lora_over_full"] = results["hf-lora"]["peak_rss_mb"] / results["hf-full"]["peak_rss_mb"]
    print(json.dumps(results, indent=2), flush=True)
    return results


def markdown(results: dict, args) -> str:
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
             f"{date.today()}. Command: `PYTHONPATH=$PWD python benchmarks/bench_finetune.py`", ""]
    if "tasks" in results:
        lines += ["| task | base | full FT | LoRA | full: min / trainable / peak RSS | LoRA: min / trainable / peak RSS |",
                  "|---|---|---|---|---|---|"]
        for task, r in results["tasks"].items():
            f, l = r["full"], r["lora"]
            lines.append(f"| {task} | {r['base']:.0%} | {f['accuracy']:.1%} | {l['accuracy']:.1%} | "
                         f"{f['minutes']:.1f} / {f['trainable_params']:,} / {f['peak_rss_mb']:,.0f} MB | "
                         f"{l['minutes']:.1f} / {l['trainable_params']:,} / {l['peak_rss_mb']:,.0f} MB |")
    if "memory" in results:
        m = results["memory"]
        lines += ["", f"| llama-110m, {MEM_STEPS} steps of {MEM_BATCH}×{MEM_SEQ} tokens | trainable parameters | "
                  "peak RSS | process minutes |", "|---|---|---|---|"]
        for method in ("full", "lora"):
            lines.append(f"| ling finetune --method {method} | {m[method]['trainable_params']:,} of "
                         f"{m[method]['total_params']:,} | {m[method]['peak_rss_mb']:,.0f} MB | {m[method]['seconds'] / 60:.1f} |")
            lines.append(f"| transformers{' + PEFT' if method == 'lora' else ''}, plain loop | | "
                         f"{m['hf-' + method]['peak_rss_mb']:,.0f} MB | {m['hf-' + method]['seconds'] / 60:.1f} |")
        lines.append(f"\nLoRA / full peak RSS: ling **{m['lora_over_full']:.2f}**, transformers + PEFT "
                     f"{m['hf_lora_over_full']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/ling-bench-finetune")
    parser.add_argument("--results", default=None, help="JSON results file (default: WORKDIR/results.json)")
    parser.add_argument("--tasks", default="add,reverse", help=f"some of {','.join(TASKS)}")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=3000, help="fine-tuning steps per run")
    parser.add_argument("--n-train", type=int, default=40000)
    parser.add_argument("--n-held-out", type=int, default=200)
    parser.add_argument("--full-lr", type=float, default=2e-3)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-memory", action="store_true")
    parser.add_argument("--hf-peer", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_peer:  # the peer's own process, started by run_peer
        return hf_peer(args.workdir, args.hf_peer)
    args.tasks = args.tasks.split(",")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if not args.only_memory:
        results["tasks"] = accuracy_part(work, args)
    if not args.skip_memory:
        results["memory"] = memory_part(work, args)
    Path(args.results or work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + markdown(results, args))


if __name__ == "__main__":
    main()
