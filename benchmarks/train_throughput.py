"""Training throughput: ling's trainer vs transformers' GPT2LMHeadModel in a plain loop.

Same model (GPT-2 layout; by default 6 layers, width 384, 6 heads, T=256, vocab 65; `--model
gpt2-124m` is GPT-2 small: 12 × 768, T=1024, vocab 50257), same micro-batch, same data,
AdamW + gradient clipping, fp32 and bf16 autocast. Each variant lives in its own worker
process (so each runs with the process settings its library gives it), and the workers take
turns, round after round, so that a busy machine slows them alike; the table gives the
median of the rounds.

    PYTHONPATH=. python benchmarks/train_throughput.py [--rounds 5] [--steps 3] [--compile] [--kernels]
        [--device cpu|cuda] [--model gpt-6x384|gpt2-124m] [--precisions fp32 bf16] [--budget S] [--smoke]

`--kernels` adds ling with `--kernels reference` (the plain model: the same math as
transformers). The table starts with the machine (`machine.py`). `--device cuda` trains on
the GPU; MFU is then against the GPU's data-sheet bf16 peak (`ling.train.metrics`), where on
CPU it is against the matmul peak probed in each round. `--budget S` stops the rounds once S
seconds have passed since the start, warm-ups included (after at least one round), so that
a time-boxed run still prints its table. `--smoke` is a seconds-long run of a 2-layer model
(one round, one step): a check that the script works, not a measurement.

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

SHAPES = {  # vocabulary, context, micro-batch, layers, width, heads
    "gpt-6x384": dict(V=65, T=256, MB=16, n_layer=6, n_embd=384, n_head=6),
    "gpt2-124m": dict(V=50257, T=1024, MB=16, n_layer=12, n_embd=768, n_head=12),
    "smoke": dict(V=65, T=32, MB=2, n_layer=2, n_embd=64, n_head=2),
}


def ling_config(shape: dict):
    from ling.config import ModelConfig

    return ModelConfig.from_name("gpt2", vocab_size=shape["V"], context_length=shape["T"], n_layer=shape["n_layer"],
                                 n_embd=shape["n_embd"], n_head=shape["n_head"])


def ling_step(precision: str, compile: bool, tokens: torch.Tensor, kernels: str, shape: dict, device: torch.device):
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

    T, MB = shape["T"], shape["MB"]
    cfg = ling_config(shape)
    model = build_model(cfg)
    train = TrainConfig(max_steps=10**6, batch_tokens=MB * T, micro_batch=MB, precision=precision, compile=compile,
                        warmup_steps=0)
    trainer = Trainer(model, train, SameBatch(), [], tempfile.mkdtemp(), device=device,
                      precision=precision, flops_per_token=cfg.flops_per_token(T), kernels=kernels)
    print(f"ling {precision}{' compiled' if compile else ''}: {trainer.kernels.summary()}", file=sys.stderr)
    return lambda: trainer.train_step().loss.item()


def hf_step(precision: str, tokens: torch.Tensor, tuned_malloc: bool, shape: dict, device: torch.device):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    if tuned_malloc:
        from ling.train.allocator import reuse_freed_memory

        reuse_freed_memory()
    transformers.logging.set_verbosity_error()
    config = GPT2Config(vocab_size=shape["V"], n_positions=shape["T"], n_embd=shape["n_embd"], n_layer=shape["n_layer"],
                        n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).to(device).train()
    # fused AdamW on CUDA, as ling's trainer uses (on CPU the default, as before)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=device.type == "cuda" or None)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def worker(conn, variant: tuple, threads: int, clock_name: str, model: str, device_name: str):
    """Build one variant, then run `n` steps whenever asked, answering with the seconds taken."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 on TF32 tensor cores, as `ling pretrain` trains
    shape = SHAPES[model]
    tokens = torch.randint(0, shape["V"], (shape["MB"], shape["T"] + 1), generator=torch.Generator().manual_seed(0))
    library, precision, option = variant
    step = (ling_step(precision, option == "compiled", tokens, "reference" if option == "reference" else "auto",
                      shape, device)
            if library == "ling"
            else hf_step(precision, tokens, option == "ling malloc", shape, device))
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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=list(SHAPES), default="gpt-6x384")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--budget", type=float, default=0,
                        help="stop the rounds this many seconds after the start, warm-ups included (0: no limit)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long check that the script runs")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.smoke:
        args.model, args.rounds, args.steps = "smoke", 1, 1
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu measures CPU time: use the wall clock with --device cuda")
    torch.set_num_threads(args.threads)
    from benchmarks.machine import describe, describe_gpu, header

    shape = SHAPES[args.model]
    T, MB = shape["T"], shape["MB"]
    on_gpu = args.device == "cuda"
    print(describe_gpu() if on_gpu else header(describe(args.threads)), flush=True)
    variants = []
    for precision in args.precisions:
        variants += [("transformers", precision, ""), ("ling", precision, "")]
        if args.kernels:
            variants.append(("ling", precision, "reference"))
        if args.compile:
            variants.append(("ling", precision, "compiled"))
    if not on_gpu and "bf16" in args.precisions:
        variants.append(("transformers", "bf16", "ling malloc"))  # glibc malloc settings: a CPU matter

    ctx = mp.get_context("spawn")
    workers = {}
    for variant in variants:  # one at a time, so warm-up timings are not shared
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, variant, args.threads, args.clock, args.model, args.device))
        proc.start()
        print(f"warm-up {variant}: {parent.recv():.1f} s", file=sys.stderr)
        workers[variant] = (proc, parent)

    from ling.train.metrics import gpu_peak_flops, probe_matmul_flops

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rates = {v: [] for v in variants}
    peaks = {"fp32": [], "bf16": []}
    gpu = torch.cuda.get_device_name() if on_gpu else None
    for r in range(args.rounds):
        for variant, (_, conn) in workers.items():
            conn.send(args.steps)
            rates[variant].append(args.steps * MB * T / conn.recv())
        if on_gpu:  # the data sheet's peak (None for a GPU not in the table)
            for kind in peaks:
                peaks[kind].append(gpu_peak_flops(gpu, kind) or float("nan"))
        else:
            # best of 3 short probes per round: one probe can land on a slow moment of a shared VM,
            # and a low peak would flatter the MFU
            peaks["fp32"].append(probe_matmul_flops(torch.float32, seconds=0.2, rounds=3, clock=clock))
            peaks["bf16"].append(probe_matmul_flops(torch.bfloat16, seconds=0.2, rounds=3, clock=clock))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        if args.budget and time.perf_counter() - started > args.budget:
            print(f"--budget {args.budget:.0f} s spent: stopping after {r + 1} round(s)", file=sys.stderr)
            break
    for proc, conn in workers.values():
        conn.send(0)
        proc.join()

    flops = ling_config(shape).flops_per_token(T)
    peak = {k: max(v) for k, v in peaks.items()}
    hf = {p: statistics.median(rates[("transformers", p, "")]) for p in args.precisions}
    base = "bf16" if "bf16" in args.precisions else args.precisions[0]
    where = (f"{gpu}, data-sheet peak bf16 {peak['bf16'] / 1e12:.0f} TFLOP/s" if on_gpu else
             f"{args.threads} thread(s); matmul peak (best of rounds): fp32 {peak['fp32'] / 1e12:.3f} TFLOP/s, bf16 "
             f"{peak['bf16'] / 1e12:.3f} TFLOP/s (rounds: {min(peaks['bf16']) / 1e12:.3f}–{peak['bf16'] / 1e12:.3f})")
    print(f"\n{args.model}: T={T}, micro-batch {MB}; {args.clock} clock, {where}; model {flops / 1e6:.1f} "
          f"MFLOP/token; median of {len(rates[variants[0]])} round(s) of {args.steps} step(s)\n")
    # MFU two ways: the median rate against the best peak of the run (the strictest), and each
    # round's rate against the peak probed in that same round (a VM's speed drifts between
    # rounds; this pairs each rate with the machine it ran on), median over the rounds
    print(f"| variant | tokens/s (median) | min–max | vs HF {base} | vs HF same precision "
          "| MFU (best bf16 peak) | MFU (same-round peak, median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (library, precision, option), values in rates.items():
        med = statistics.median(values)
        paired = statistics.median(rate * flops / p for rate, p in zip(values, peaks["bf16"]))
        name = ("transformers GPT2LMHeadModel" if library == "transformers" else "ling") + f", {precision}"
        name += f", {option}" if option else ""
        print(f"| {name} | {med:,.0f} | {min(values):,.0f}–{max(values):,.0f} | {med / hf[base]:.2f}× | "
              f"{med / hf[precision]:.2f}× | {med * flops / peak['bf16']:.1%} | {paired:.1%} |", flush=True)


if __name__ == "__main__":
    main()
