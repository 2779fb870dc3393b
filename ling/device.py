"""Which device and which precision to run on, when the user says `auto`."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from ling.errors import LingError


def pick_device(name: str = "auto") -> torch.device:
    """`auto` = cuda > mps > cpu; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LingError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LingError("--device cuda: no CUDA GPU is available to this torch build (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LingError("--device mps: MPS is not available on this machine (use --device cpu)")
    return device


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (what benchmarks and caches are keyed by)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(precision: str, device: torch.device) -> str:
    """Resolve `auto` to bf16 where this device does bf16 matmuls natively, else fp32; and
    refuse combinations that cannot work."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise LingError(f"precision fp16 (with a gradient scaler) needs a CUDA GPU, not {device.type}; use bf16 or fp32")
    return precision
