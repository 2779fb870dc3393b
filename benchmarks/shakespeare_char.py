"""Quality per wall-clock: `ling pretrain --config configs/shakespeare-char-cpu.yaml` on
tinyshakespeare, character-level. Reports the total wall time of the command (start-up,
training, evaluation, checkpoints and report included) and the final validation loss.

The peer is nanoGPT's README CPU recipe (4 layers × 128, T=64, 2,000 iterations), which
reaches val loss 1.886 in 67 s on this machine (issue #3); the target is ≤ 1.65 in ≤ 67 s.

    PYTHONPATH=. python benchmarks/shakespeare_char.py [--text ../shared/data/tinyshakespeare.txt] [--runs 1]

(`--text` defaults to ../shared/data/tinyshakespeare.txt beside the repository.)

The dataset is prepared once (not timed) with
`ling prepare --input TEXT --tokenizer char --output DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "shakespeare-char-cpu.yaml"))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--work", default=tempfile.gettempdir(), help="where the dataset and runs go")
    args, extra = parser.parse_known_args()  # extra: flags passed on to ling pretrain
    work = Path(args.work)
    data = work / "ling-bench-shakespeare-char"
    ling = [sys.executable, "-m", "ling"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not (data / "meta.json").exists():
        subprocess.run(ling + ["prepare", "--input", args.text, "--tokenizer", "char", "--output", str(data)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    results = []
    for i in range(args.runs):
        run = Path(tempfile.mkdtemp(prefix="ling-bench-run-", dir=work))
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run(ling + ["pretrain", "--data", str(data), "--out", str(run), "--config", args.config, *extra],
                       check=True, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in records if r["kind"] == "eval"][-1]
        train = [r for r in records if r["kind"] == "train"]
        rate = sum(r["tokens_per_s"] for r in train) / len(train)
        results.append((seconds, val["val_loss"], val["step"], val["tokens"], rate, load))
        print(f"run {i + 1}: {seconds:.1f} s wall, val loss {val['val_loss']:.4f} at step {val['step']} "
              f"({val['tokens']:,} tokens, ~{rate:,.0f} tokens/s while training; load average {load:.1f} before), "
              f"report: {run / 'report.png'}")
    best = min(results, key=lambda r: r[0])
    print(f"\n| command | wall time | val loss | tokens | load avg |\n|---|---:|---:|---:|---:|\n"
          f"| ling pretrain --config {Path(args.config).relative_to(ROOT)} | {best[0]:.1f} s | {best[1]:.4f} | "
          f"{best[3]:,} | {best[5]:.1f} |\n| nanoGPT CPU recipe (issue #3, not re-run) | 67 s | 1.886 | 1,536,000 | |")


if __name__ == "__main__":
    main()
