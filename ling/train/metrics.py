"""Speed: tokens per second and model FLOPs utilisation (MFU) against the device's peak.

Rates are tokens divided by the *duration* of the window they were processed in (a
difference of two clock readings, eval and checkpoint time excluded), never by an absolute
timestamp. MFU = achieved model FLOP/s ÷ peak FLOP/s of the devices used, where model
FLOPs per token come from the model (`ModelConfig.flops_per_token`) and the peak is a
table for known GPUs and, on CPUs, a short matmul probe measured once and cached.
"""

from __future__ import annotations

import json
import re
import time

import torch

from ling.atomic import atomic_file
from ling.cache import cache_dir
from ling.device import cpu_name

# Dense (no sparsity) peak FLOP/s per GPU from vendor data sheets: bf16/fp16 tensor cores
# (with fp32 accumulation, as autocast uses them), and fp32 as TF32 tensor cores (ling
# trains fp32 on CUDA with TF32 matmuls). Keys are matched as whole words of the name
# `torch.cuda.get_device_name` gives, longest first: "NVIDIA H100 PCIe" is the PCIe card,
# "NVIDIA H100 80GB HBM3" the SXM one, "NVIDIA L40S" not an "L4".
GPU_PEAK_FLOPS = {
    "B200": {"bf16": 2250e12, "fp32": 1100e12},
    "GH200": {"bf16": 989e12, "fp32": 495e12},
    "H200 NVL": {"bf16": 835e12, "fp32": 418e12},
    "H200": {"bf16": 989e12, "fp32": 495e12},
    "H100 NVL": {"bf16": 835e12, "fp32": 418e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp32": 495e12},  # SXM5 ("H100 80GB HBM3", "H100 SXM5 80GB")
    "A100": {"bf16": 312e12, "fp32": 156e12},  # 40 GB and 80 GB, SXM4 and PCIe alike
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "L40": {"bf16": 181e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
    "A10G": {"bf16": 70e12, "fp32": 35e12},
    "A10": {"bf16": 125e12, "fp32": 62.5e12},
    "RTX 6000 Ada": {"bf16": 364e12, "fp32": 182e12},
    "RTX A6000": {"bf16": 155e12, "fp32": 77.4e12},
    "RTX 4090": {"bf16": 165e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp32": 35.6e12},
    "V100": {"bf16": 125e12, "fp32": 15.7e12},  # fp16 tensor cores (no bf16)
    "T4": {"bf16": 65e12, "fp32": 8.1e12},  # fp16 tensor cores (no bf16)
}


def gpu_peak_flops(name: str, kind: str) -> float | None:
    """The table's peak for the GPU called `name` (as `torch.cuda.get_device_name` says) at
    `kind` ('bf16' — also fp16 — or 'fp32'); None for a GPU not in the table."""
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return GPU_PEAK_FLOPS[key][kind]
    return None


def peak_memory(device: torch.device) -> int | None:
    """The most bytes of GPU memory tensors have held on `device` so far
    (`torch.cuda.max_memory_allocated`); None off CUDA (CPU memory is the process's RSS)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class Throughput:
    """Tokens per second over windows of training steps.

    `start()` opens a window, `add(n)` counts tokens, `lap()` closes the window (returning
    its rate) and opens the next. Time between a `lap()` and the next `start()` — an
    evaluation, a checkpoint — is not counted: call `start()` after it.
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.total_tokens = 0
        self.total_seconds = 0.0
        self._window_tokens = 0
        self._t0: float | None = None

    def start(self) -> None:
        self._t0, self._window_tokens = self.clock(), 0

    def add(self, tokens: int) -> None:
        self._window_tokens += tokens

    def lap(self) -> float:
        now = self.clock()
        elapsed = now - self._t0
        rate = self._window_tokens / elapsed if elapsed > 0 else 0.0
        self.total_tokens += self._window_tokens
        self.total_seconds += elapsed
        self._t0, self._window_tokens = now, 0
        return rate

    @property
    def average(self) -> float:
        """Tokens per second over every window so far."""
        return self.total_tokens / self.total_seconds if self.total_seconds > 0 else 0.0


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over the peak of all devices."""
    if not peak_flops_per_device:
        return None
    return tokens_per_s * flops_per_token / (peak_flops_per_device * n_devices)


def peak_flops(device: torch.device, precision: str, refresh: bool = False) -> float | None:
    """Peak FLOP/s of one device at this precision; None when unknown (MFU is then not shown).
    `refresh` re-probes a CPU (see `cpu_peak_flops`)."""
    kind = "fp32" if precision == "fp32" else "bf16"
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), kind)
    if device.type == "cpu":
        return cpu_peak_flops(torch.float32 if kind == "fp32" else torch.bfloat16, refresh)
    return None


def cpu_peak_flops(dtype: torch.dtype, refresh: bool = False) -> float:
    """Matmul FLOP/s of this CPU with torch's current thread count, probed once and cached
    (keyed by CPU, threads, dtype and torch version) in peak_flops.json of ling's cache directory (`ling.cache`).

    A probe taken while other work shared the cores reads low; `refresh` probes again and
    keeps the higher of the two (the trainer asks for it when an MFU above 100 % shows the
    cached peak is too low)."""
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}"
    cache = cache_dir() / "peak_flops.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key not in known or refresh:
        known[key] = max(probe_matmul_flops(dtype), float(known.get(key, 0.0)))
        try:
            with atomic_file(cache) as f:
                json.dump(known, f, indent=2)
        except OSError:
            pass  # a read-only home only costs a re-probe next time
    return float(known[key])


def probe_matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.2, rounds: int = 3,
                       clock=time.perf_counter) -> float:
    """Best FLOP/s of n×n matmuls over a few short rounds (the best filters out noise).

    A 256² matmul first says how fast this dtype is here; n shrinks (by halves) until one
    matmul takes at most half a round, so that a CPU which emulates the dtype (bf16 without
    AVX512-BF16 or AMX, a hundred times slower) is probed in about the same time."""
    small = torch.randn(256, 256, dtype=dtype)
    small @ small  # the first call pays for the library's set-up
    t0 = clock()
    small @ small
    rate = 2 * 256**3 / max(clock() - t0, 1e-9)
    while n > 256 and 2 * n**3 / rate > seconds / 2:
        n //= 2
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(rounds):
        count, t0 = 0, clock()
        while (elapsed := clock() - t0) < seconds:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / elapsed)
    return best
