"""What each process holds, and how fast it trains: DDP vs FSDP at 2 processes (torchrun, gloo).

A GPT-2-small-shaped model (124M parameters, where weights, gradients and AdamW's two
moments dominate a process's memory) trains through ling's own trainer (`Trainer.train_step`,
the code `ling pretrain` runs) on a fixed random batch per process. For each parallel mode a
fresh `torchrun --nproc-per-node 2` job builds the model, takes one warm-up step and then
`--steps` timed steps; the modes take turns, round after round, so a busy machine slows them
alike, and the table gives the medians. Per process it reports:

- state: the bytes of this process's parameters + gradients + optimizer state, counted from
  the tensors themselves (a DTensor counts its local shard);
- RSS: the process's resident memory minus its resident memory before the model was built —
  after the warm-up step (freed memory handed back to the OS with `malloc_trim`), at its
  peak during the timed steps (on CUDA: `torch.cuda.max_memory_allocated`), and at its peak
  over the whole job, building the model included: state plus everything else the process
  holds (DDP's gradient buckets, FSDP's gathered groups and their gradients, activations);
- tokens/s of the whole job (both processes).

    PYTHONPATH=. python benchmarks/bench_fsdp.py [--rounds 2] [--steps 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Start the kernel's peak-RSS counter (VmHWM) afresh from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(args) -> None:
    from ling.config import ModelConfig
    from ling.data.batch import Batch
    from ling.model import build_model
    from ling.train import distributed
    from ling.train.config import TrainConfig
    from ling.train.trainer import Trainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = distributed.init_distributed(device.type, args.parallel)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    baseline = _rss()
    cfg = ModelConfig.from_name("gpt2", context_length=args.seq_len)
    generator = torch.Generator().manual_seed(dist.rank)
    tokens = torch.randint(cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator)

    class SameBatch:
        def next_step(self):
            return [Batch(tokens[:, :-1], tokens[:, 1:])]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    torch.manual_seed(0)
    model = build_model(cfg, device=device)
    n_params = model.num_params()
    train = TrainConfig(max_steps=10**6, batch_tokens=args.micro_batch * args.seq_len * dist.world_size,
                        micro_batch=args.micro_batch, precision=args.precision, warmup_steps=0, parallel=args.parallel)
    trainer = Trainer(model, train, SameBatch(), [], tempfile.mkdtemp(), device=device, precision=args.precision,
                      dist=dist, flops_per_token=cfg.flops_per_token(args.seq_len), kernels="reference")
    trainer.train_step()  # warm-up; the optimizer state now exists
    params = _local_bytes(trainer.model.parameters())
    grads = _local_bytes(p for p in trainer.model.parameters() if p.requires_grad)  # one fp32 gradient each
    optimizer = _local_bytes(v for s in trainer.optimizer.state.values() for v in s.values()
                             if torch.is_tensor(v) and v.dim() > 0)
    if sys.platform.startswith("linux"):  # hand back what building the model and the warm-up freed
        ctypes.CDLL(None).malloc_trim(0)
    steady = _rss() - baseline
    if device.type == "cpu":
        _reset_peak_rss()
    distributed.barrier(dist)
    start = time.perf_counter()
    losses = [trainer.train_step().loss.item() for _ in range(args.steps)]
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _peak_rss() - baseline
    init_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    rows = distributed.gather_objects({"params": params, "grads": grads, "optimizer": optimizer, "peak": peak,
                                       "steady": steady, "init_peak": init_peak}, dist)
    if dist.is_main:
        print(json.dumps({"parallel": args.parallel, "n_params": n_params, "ranks": rows, "losses": losses,
                          "tokens_per_s": args.steps * train.batch_tokens / seconds}))
    distributed.shutdown(dist)


def run_job(args, parallel: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "--worker", "--parallel", parallel, "--steps", str(args.steps), "--precision", args.precision,
           "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{parallel} job failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT))
    from benchmarks.machine import describe, header

    print(header(describe(threads=args.threads)))
    results = {"ddp": [], "fsdp": []}
    for r in range(args.rounds):
        for parallel in results:
            results[parallel].append(run_job(args, parallel))
            print(f"round {r + 1} {parallel}: {results[parallel][-1]['tokens_per_s']:,.0f} tok/s", file=sys.stderr)
    gib = 2**30
    first = results["ddp"][0]
    print(f"\nmodel: {first['n_params'] / 1e6:.1f}M parameters · {args.precision} · 2 processes × micro-batch "
          f"{args.micro_batch} × {args.seq_len} tokens · {args.threads} thread(s) each · {args.steps} timed steps, "
          f"median of {args.rounds} rounds\n")
    print("| per process | params | grads | optimizer | state (sum) | RSS after warm-up | peak RSS in steps "
          "| peak RSS incl. building | tokens/s (job) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for parallel, runs in results.items():
        rank0 = runs[0]["ranks"][0]
        state = rank0["params"] + rank0["grads"] + rank0["optimizer"]
        rss = [statistics.median(max(r[key] for r in run["ranks"]) for run in runs)
               for key in ("steady", "peak", "init_peak")]
        speed = statistics.median(run["tokens_per_s"] for run in runs)
        summary[parallel] = (state, *rss, speed)
        print(f"| {parallel.upper()} | {rank0['params'] / gib:.2f} GiB | {rank0['grads'] / gib:.2f} GiB | "
              f"{rank0['optimizer'] / gib:.2f} GiB | {state / gib:.2f} GiB | "
              + " | ".join(f"{v / gib:.2f} GiB" for v in rss) + f" | {speed:,.0f} |")
    ratios = [f / d for f, d in zip(summary["fsdp"], summary["ddp"])]
    print("| FSDP / DDP | | | | " + " | ".join(f"**{r:.2f}×**" for r in ratios[:-1]) + f" | {ratios[-1]:.2f}× |")
    gap = max(abs(a - b) / abs(b) for a, b in zip(results["ddp"][0]["losses"], results["fsdp"][0]["losses"]))
    print(f"end: load average {os.getloadavg()[0]:.1f}")
    print(f"\nlosses of the timed steps, DDP {results['ddp'][0]['losses']} · FSDP {results['fsdp'][0]['losses']}"
          f" (largest relative difference {gap:.1e})")


if __name__ == "__main__":
    main()
