"""What machine a benchmark ran on: the header every results table in BENCHMARKS.md starts with.

Speed tuned on one CPU does not transfer to another, so a table is only meaningful with the
CPU it was measured on: its model name, the ISA extensions ling's kernels care about
(AVX-512, AVX512-BF16, AMX), and two measured ceilings — the memory read bandwidth (what
bounds decoding) and the matmul peaks (what bounds training) — at the benchmark's thread
count, with the load average, torch version and date.

    PYTHONPATH=. python benchmarks/machine.py [--threads 2] [--device cuda]

On a GPU (`describe_gpu`): its name, memory, compute capability and data-sheet bf16 peak
(`ling.train.metrics`), the torch and CUDA versions, and the CPU beside it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from ling.device import cpu_name
from ling.train.metrics import probe_matmul_flops

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def isa_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ISA_FLAGS if f in flags]


def read_bandwidth(megabytes: int = 256, rounds: int = 5) -> float:
    """Bytes per second of reading a large fp32 tensor once (a sum), best of `rounds`."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def describe(threads: int | None = None) -> dict:
    """The machine's identity and measured ceilings (with torch's current thread count)."""
    if threads is not None:
        torch.set_num_threads(threads)
    return {
        "cpu": cpu_name(), "flags": isa_flags(), "threads": torch.get_num_threads(),
        "read_bytes_per_s": read_bandwidth(),
        "fp32_flops": probe_matmul_flops(torch.float32, n=2048), "bf16_flops": probe_matmul_flops(torch.bfloat16, n=2048),
        "torch": torch.__version__, "load": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
    }


def header(info: dict) -> str:
    """The machine as the Markdown lines that head a results table."""
    return (f"- CPU: {info['cpu']} ({', '.join(info['flags']) or 'no AVX-512/AMX'}), {info['threads']} thread(s)\n"
            f"- measured: read {info['read_bytes_per_s'] / 1e9:.1f} GB/s · matmul 2048² fp32 "
            f"{info['fp32_flops'] / 1e12:.2f} TFLOP/s, bf16 {info['bf16_flops'] / 1e12:.2f} TFLOP/s\n"
            f"- torch {info['torch']}, load average {info['load']:.1f} at the start, {info['date']}")


def describe_gpu(index: int = 0) -> str:
    """The GPU a benchmark runs on, as the Markdown lines that head its table."""
    from ling.train.metrics import gpu_peak_flops

    props = torch.cuda.get_device_properties(index)
    peak = gpu_peak_flops(props.name, "bf16")
    return (f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
            f"data-sheet bf16 peak {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}\n"
            f"- host CPU: {cpu_name()}, {os.cpu_count()} cores\n"
            f"- torch {torch.__version__} (CUDA {torch.version.cuda}), {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    print(describe_gpu() if args.device == "cuda" else header(describe(args.threads)))
