"""Throughput / MFU arithmetic, the cached CPU peak probe, and the run's metrics files."""

import json
import sys

import pytest
import torch

from ling.train import metrics
from ling.train.metrics import Throughput, mfu
from ling.train.report import MetricsLog


class FakeClock:
    """Monotonic readings far from zero: dividing by a reading instead of a duration shows."""

    def __init__(self, *readings):
        self.readings = list(readings)

    def __call__(self):
        return self.readings.pop(0)


def test_tokens_per_second_is_tokens_over_the_window_duration():
    meter = Throughput(clock=FakeClock(1_000_000.0, 1_000_002.0, 1_000_003.0, 1_000_010.0, 1_000_011.0))
    meter.start()                       # t = 1e6
    for _ in range(3):
        meter.add(4096)
    assert meter.lap() == 6144.0        # 12288 tokens in 2 s
    meter.add(4096)
    assert meter.lap() == 4096.0        # 4096 tokens in 1 s
    # an evaluation runs from t=1e6+3 to 1e6+10: restarting the window leaves it out
    meter.start()
    meter.add(8192)
    assert meter.lap() == 8192.0
    assert meter.total_tokens == 24576 and meter.total_seconds == 4.0
    assert meter.average == 6144.0


def test_mfu_is_achieved_over_peak_flops_of_all_devices():
    # 10,000 tok/s × 71e6 FLOPs/token = 0.71 TFLOP/s against a 1 TFLOP/s peak
    assert mfu(10_000, 71e6, 1e12) == pytest.approx(0.71)
    assert mfu(10_000, 71e6, 1e12, n_devices=2) == pytest.approx(0.355)
    assert mfu(10_000, 71e6, None) is None


def test_cpu_peak_is_probed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LING_CACHE", str(tmp_path / "ling"))
    calls = []
    monkeypatch.setattr(metrics, "probe_matmul_flops", lambda dtype: calls.append(dtype) or 5e11)
    assert metrics.peak_flops(torch.device("cpu"), "bf16") == 5e11
    assert metrics.peak_flops(torch.device("cpu"), "bf16") == 5e11
    assert metrics.peak_flops(torch.device("cpu"), "fp32") == 5e11
    assert calls == [torch.bfloat16, torch.float32]
    cached = json.loads((tmp_path / "ling" / "peak_flops.json").read_text())
    assert sorted(cached.values()) == [5e11, 5e11]


def test_a_refresh_reprobes_and_keeps_the_higher_peak(tmp_path, monkeypatch):
    # a probe taken while the cores were busy reads low; the trainer refreshes it when MFU > 100 %
    monkeypatch.setenv("LING_CACHE", str(tmp_path / "ling"))
    probes = iter([1e9, 5e11, 2e11])
    monkeypatch.setattr(metrics, "probe_matmul_flops", lambda dtype: next(probes))
    cpu = torch.device("cpu")
    assert metrics.peak_flops(cpu, "bf16") == 1e9
    assert metrics.peak_flops(cpu, "bf16", refresh=True) == 5e11
    assert metrics.peak_flops(cpu, "bf16", refresh=True) == 5e11  # a lower probe never replaces it
    assert metrics.peak_flops(cpu, "bf16") == 5e11


def test_probe_measures_a_positive_rate():
    assert metrics.probe_matmul_flops(torch.float32, n=64, seconds=0.01, rounds=1) > 0


def test_gpu_peaks_come_from_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert metrics.peak_flops(torch.device("cuda"), "bf16") == 312e12
    assert metrics.peak_flops(torch.device("cuda"), "fp16") == 312e12  # fp16 tensor cores: the same peak
    assert metrics.peak_flops(torch.device("cuda"), "fp32") == 156e12  # TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    assert metrics.peak_flops(torch.device("cuda"), "bf16") == 70e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert metrics.peak_flops(torch.device("cuda"), "bf16") is None


@pytest.mark.parametrize("name, bf16", [
    # names as torch.cuda.get_device_name reports them
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM5
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA A10G", 70e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA GeForce RTX 3090", 71e12),
    ("NVIDIA RTX A6000", 155e12),
    ("NVIDIA RTX 6000 Ada Generation", 364e12),
    ("Tesla V100-SXM2-16GB", 125e12),
    ("Tesla T4", 65e12),
])
def test_gpu_peak_table_matches_whole_names_longest_first(name, bf16):
    assert metrics.gpu_peak_flops(name, "bf16") == bf16


def test_gpu_peak_table_knows_no_partial_names():
    for name in ("NVIDIA GeForce RTX 4080", "NVIDIA A1000", "AMD Instinct MI300X", "NVIDIA L4000"):
        assert metrics.gpu_peak_flops(name, "bf16") is None


def test_peak_memory_is_a_cuda_figure_only():
    assert metrics.peak_memory(torch.device("cpu")) is None


def test_metrics_log_writes_jsonl_drops_lines_past_a_resume_and_draws_the_report(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step, "loss": 4.0 - step / 10, "lr": 1e-3, "tokens_per_s": 100.0})
    log.write({"kind": "eval", "step": 2, "val_loss": 3.9})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # torn by a kill
    resumed = MetricsLog(tmp_path)
    resumed.resume_at(2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [("train", 1), ("train", 2), ("eval", 2)]
    resumed.plot()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_gets_every_numeric_metric_when_installed(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    import ling.train.report as report

    monkeypatch.setattr(report, "_tensorboard_writer", lambda log_dir: FakeWriter(log_dir))
    log = MetricsLog(tmp_path)
    log.write({"kind": "train", "step": 5, "loss": 2.5, "lr": 0.1, "mfu": None})
    log.write({"kind": "eval", "step": 5, "val_loss": 2.7, "sample": "text"})
    assert scalars == [("train/loss", 2.5, 5), ("train/lr", 0.1, 5), ("eval/val_loss", 2.7, 5)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt only exists on Linux")
def test_glibc_is_told_to_keep_freed_memory():
    from ling.train.allocator import reuse_freed_memory

    assert reuse_freed_memory() is True
