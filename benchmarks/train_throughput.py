"""Training throughput: ling's trainer vs transformers' GPT2LMHeadModel in a plain loop.

Same model (GPT-2 layout: 6 layers, width 384, 6 heads, T=256, vocab 65), same micro-batch
(16), same data, AdamW, fp32 and bf16 autocast. Variants run interleaved, round after round,
so that a busy machine slows them alike; the table gives the median of the rounds.

    PYTHONPATH=. python benchmarks/train_throughput.py [--rounds 5] [--steps 3] [--compile]

On a busy machine, `--threads 1 --clock cpu` measures process CPU time on one thread
instead of wall time: other processes then barely move the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ling.config import ModelConfig
from ling.data.batch import Batch
from ling.model import build_model
from ling.train.config import TrainConfig
from ling.train.metrics import probe_matmul_flops
from ling.train.trainer import Trainer

V, T, MB = 65, 256, 16
CFG = ModelConfig.from_name("gpt2", vocab_size=V, context_length=T, n_layer=6, n_embd=384, n_head=6)


class RandomBatches:
    def __init__(self, tokens):
        self.batch = Batch(tokens[:, :-1], tokens[:, 1:])

    def next_step(self):
        return [self.batch]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def ling_step(precision: str, compile: bool, tokens: torch.Tensor, run_dir: Path):
    torch.manual_seed(0)
    model = build_model(CFG)
    cfg = TrainConfig(max_steps=10**6, batch_tokens=MB * T, micro_batch=MB, precision=precision, compile=compile,
                      warmup_steps=0)
    trainer = Trainer(model, cfg, RandomBatches(tokens), [], run_dir, device=torch.device("cpu"),
                      precision=precision, tokens_per_step=MB * T, flops_per_token=CFG.flops_per_token(T))

    def step():
        loss, _, _ = trainer.train_step()
        loss.item()

    return step


def hf_step(precision: str, tokens: torch.Tensor):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=T, n_embd=384, n_layer=6, n_head=6, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add ling with --train.compile")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (with --threads 1, robust to other load)")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    tokens = torch.randint(0, V, (MB, T + 1), generator=torch.Generator().manual_seed(0))
    run_dir = Path(tempfile.mkdtemp())

    variants = {}
    for precision in ("fp32", "bf16"):
        variants[f"transformers GPT2LMHeadModel, {precision}"] = hf_step(precision, tokens)
        variants[f"ling, {precision}"] = ling_step(precision, False, tokens, run_dir)
        if args.compile:
            variants[f"ling, {precision}, compiled"] = ling_step(precision, True, tokens, run_dir)
    for name, step in variants.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        step()
        step()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    rates = {name: [] for name in variants}
    peaks = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for name, step in variants.items():
            t0 = clock()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * MB * T / (clock() - t0))
        peaks["fp32"].append(probe_matmul_flops(torch.float32, seconds=0.2, rounds=1, clock=clock))
        peaks["bf16"].append(probe_matmul_flops(torch.bfloat16, seconds=0.2, rounds=1, clock=clock))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    flops = CFG.flops_per_token(T)
    peak = {k: max(v) for k, v in peaks.items()}
    hf = {p: statistics.median(rates[f"transformers GPT2LMHeadModel, {p}"]) for p in ("fp32", "bf16")}
    print(f"\n{args.clock} clock; matmul peak (best of rounds, {args.threads} threads): fp32 {peak['fp32'] / 1e12:.3f} TFLOP/s, "
          f"bf16 {peak['bf16'] / 1e12:.3f} TFLOP/s; model {flops / 1e6:.1f} MFLOP/token\n")
    print("| variant | tokens/s (median) | min–max | vs HF bf16 | vs HF same precision | MFU (bf16 peak) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in rates.items():
        med = statistics.median(values)
        precision = "bf16" if "bf16" in name else "fp32"
        print(f"| {name} | {med:,.0f} | {min(values):,.0f}–{max(values):,.0f} | {med / hf['bf16']:.2f}× | "
              f"{med / hf[precision]:.2f}× | {med * flops / peak['bf16']:.1%} |")


if __name__ == "__main__":
    main()
