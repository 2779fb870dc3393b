"""benchmarks/gpu_check.sh on a machine without a GPU: its smoke run (tiny models on the CPU)
goes through every part — the `cuda` tests (all skipped, with the reason), the training
and the decoding benchmarks — so that the one run a GPU machine gets does not die on a typo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_the_smoke_run_writes_a_report_with_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    for part in ("pytest", "train", "decode"):
        assert f"<!-- {part}: " in report, (part, (tmp_path / f"{part}.log").read_text()[-2000:])
    assert "skipped" in report and "needs a CUDA GPU" in report  # the cuda tests were collected and skipped
    assert "| transformers GPT2LMHeadModel, bf16 |" in report and "| ling, bf16 |" in report
    assert "| smoke-llama | fp32 | 2 | ling |" in report and "| smoke-llama | fp32 | 2 | transformers |" in report
