"""Training throughput: ling's trainer vs transformers' GPT2LMHeadModel in a plain loop.

Same model (GPT-2 layout: 6 layers, width 384, 6 heads, T=256, vocab 65), same micro-batch
(16), same data, AdamW + gradient clipping, fp32 and bf16 autocast. Each variant lives in its
own worker process (so each runs with the process settings its library gives it), and the
workers take turns, round after round, so that a busy machine slows them alike; the table
gives the median of the rounds.

    PYTHONPATH=. python benchmarks/train_throughput.py [--rounds 5] [--steps 3] [--compile] [--kernels]

`--kernels` adds ling with `--kernels reference` (the plain model: the same math as
transformers). The table starts with the machine (`machine.py`).

On a busy machine, `--threads 1 --clock cpu` measures each worker's CPU time on one thread
instead of wall time: other processes then barely move the ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time

import torch

V, T, MB = 65, 256, 16


def ling_step(precision: str, compile: bool, tokens: torch.Tensor, kernels: str = "auto"):
    from ling.config import ModelConfig
    from ling.data.batch import Batch
    from ling.model import build_model
    from ling.train.config import TrainConfig
    from ling.train.trainer import Trainer

    class SameBatch:
        def next_step(self):
            return [Batch(tokens[:, :-1], tokens[:, 1:])]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    cfg = ModelConfig.from_name("gpt2", vocab_size=V, context_length=T, n_layer=6, n_embd=384, n_head=6)
    model = build_model(cfg)
    train = TrainConfig(max_steps=10**6, batch_tokens=MB * T, micro_batch=MB, precision=precision, compile=compile,
                        warmup_steps=0)
    trainer = Trainer(model, train, SameBatch(), [], tempfile.mkdtemp(), device=torch.device("cpu"),
                      precision=precision, flops_per_token=cfg.flops_per_token(T), kernels=kernels)
    print(f"ling {precision}{' compiled' if compile else ''}: {trainer.kernels.summary()}", file=sys.stderr)
    return lambda: trainer.train_step().loss.item()


def hf_step(precision: str, tokens: torch.Tensor, tuned_malloc: bool):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    if tuned_malloc:
        from ling.train.allocator import reuse_freed_memory

        reuse_freed_memory()
    transformers.logging.set_verbosity_error()
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
        return loss.item()

    return step


def worker(conn, variant: tuple, threads: int, clock_name: str):
    """Build one variant, then run `n` steps whenever asked, answering with the seconds taken."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (MB, T + 1), generator=torch.Generator().manual_seed(0))
    library, precision, option = variant
    step = (ling_step(precision, option == "compiled", tokens, "reference" if option == "reference" else "auto")
            if library == "ling"
            else hf_step(precision, tokens, option == "ling malloc"))
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    t0 = time.perf_counter()
    step()
    step()  # warm-up (and compilation)
    conn.send(time.perf_counter() - t0)
    while (n := conn.recv()) > 0:
        t0 = clock()
        for _ in range(n):
            step()
        conn.send(clock() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add ling with --train.compile")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (with --threads 1, robust to other load)")
    parser.add_argument("--kernels", action="store_true", help="add ling with --kernels reference (the plain model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from benchmarks.machine import describe, header

    print(header(describe(args.threads)), flush=True)
    variants = []
    for precision in ("fp32", "bf16"):
        variants += [("transformers", precision, ""), ("ling", precision, "")]
        if args.kernels:
            variants.append(("ling", precision, "reference"))
        if args.compile:
            variants.append(("ling", precision, "compiled"))
    variants.append(("transformers", "bf16", "ling malloc"))

    ctx = mp.get_context("spawn")
    workers = {}
    for variant in variants:  # one at a time, so warm-up timings are not shared
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, variant, args.threads, args.clock))
        proc.start()
        print(f"warm-up {variant}: {parent.recv():.1f} s", file=sys.stderr)
        workers[variant] = (proc, parent)

    from ling.train.metrics import probe_matmul_flops

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rates = {v: [] for v in variants}
    peaks = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for variant, (_, conn) in workers.items():
            conn.send(args.steps)
            rates[variant].append(args.steps * MB * T / conn.recv())
        # best of 3 short probes per round: one probe can land on a slow moment of a shared VM,
        # and a low peak would flatter the MFU
        peaks["fp32"].append(probe_matmul_flops(torch.float32, seconds=0.2, rounds=3, clock=clock))
        peaks["bf16"].append(probe_matmul_flops(torch.bfloat16, seconds=0.2, rounds=3, clock=clock))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    for proc, conn in workers.values():
        conn.send(0)
        proc.join()

    from ling.config import ModelConfig

    flops = ModelConfig.from_name("gpt2", vocab_size=V, context_length=T, n_layer=6, n_embd=384,
                                  n_head=6).flops_per_token(T)
    peak = {k: max(v) for k, v in peaks.items()}
    hf = {p: statistics.median(rates[("transformers", p, "")]) for p in ("fp32", "bf16")}
    print(f"\n{args.clock} clock, {args.threads} thread(s); matmul peak (best of rounds): fp32 "
          f"{peak['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peak['bf16'] / 1e12:.3f} TFLOP/s (rounds: "
          f"{min(peaks['bf16']) / 1e12:.3f}–{peak['bf16'] / 1e12:.3f}); model {flops / 1e6:.1f} MFLOP/token\n")
    # MFU two ways: the median rate against the best peak of the run (the strictest), and each
    # round's rate against the peak probed in that same round (a VM's speed drifts between
    # rounds; this pairs each rate with the machine it ran on), median over the rounds
    print("| variant | tokens/s (median) | min–max | vs HF bf16 | vs HF same precision "
          "| MFU (best bf16 peak) | MFU (same-round peak, median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (library, precision, option), values in rates.items():
        med = statistics.median(values)
        paired = statistics.median(rate * flops / p for rate, p in zip(values, peaks["bf16"]))
        name = ("transformers GPT2LMHeadModel" if library == "transformers" else "ling") + f", {precision}"
        name += f", {option}" if option else ""
        print(f"| {name} | {med:,.0f} | {min(values):,.0f}–{max(values):,.0f} | {med / hf['bf16']:.2f}× | "
              f"{med / hf[precision]:.2f}× | {med * flops / peak['bf16']:.1%} | {paired:.1%} |")


if __name__ == "__main__":
    main()
