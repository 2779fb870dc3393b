"""Quality per wall-clock: `ling pretrain --config configs/shakespeare-char-cpu.yaml` on
tinyshakespeare, character-level. Reports the total wall time of the command (start-up,
training, evaluation, checkpoints and report included) and the final validation loss.

The peer is nanoGPT's README CPU recipe (4 layers × 128, T=64, 2,000 iterations), which
reaches val loss 1.886 in 67 s on this machine (issue #3); the target is ≤ 1.65 in ≤ 67 s.

    PYTHONPATH=. python benchmarks/shakespeare_char.py [--text ../shared/data/tinyshakespeare.txt] [--runs 1]
        [--config A.yaml [B.yaml ...]] [--threads N]

(`--text` defaults to ../shared/data/tinyshakespeare.txt beside the repository.) Several
configs run interleaved, round by round. On a shared machine `--threads 1` with the CPU-time
column (the child's user + system time) says more than the wall time; the validation loss
of a run does not depend on the load (a run is deterministic).

The dataset is prepared once (not timed) with
`ling prepare --input TEXT --tokenizer char --output DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--config", nargs="+", default=[str(ROOT / "configs" / "shakespeare-char-cpu.yaml")])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each run (default: all cores)")
    parser.add_argument("--work", default=tempfile.gettempdir(), help="where the dataset and runs go")
    args, extra = parser.parse_known_args()  # extra: flags passed on to ling pretrain
    work = Path(args.work)
    data = work / "ling-bench-shakespeare-char"
    ling = [sys.executable, "-m", "ling"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not (data / "meta.json").exists():
        subprocess.run(ling + ["prepare", "--input", args.text, "--tokenizer", "char", "--output", str(data)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    results = {config: [] for config in args.config}
    for i in range(args.runs):
        for config in args.config:
            run = Path(tempfile.mkdtemp(prefix="ling-bench-run-", dir=work))
            load = os.getloadavg()[0]
            cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(ling + ["pretrain", "--data", str(data), "--out", str(run), "--config", config, *extra],
                           check=True, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            val = [r for r in records if r["kind"] == "eval"][-1]
            train = [r for r in records if r["kind"] == "train"]
            rate = sum(r["tokens_per_s"] for r in train) / len(train)
            results[config].append((seconds, cpu, val["val_loss"], val["tokens"], load))
            print(f"round {i + 1}, {Path(config).name}: {seconds:.1f} s wall, {cpu:.1f} s CPU, val loss "
                  f"{val['val_loss']:.4f} at step {val['step']} ({val['tokens']:,} tokens, ~{rate:,.0f} tokens/s "
                  f"while training; load average {load:.1f} before), report: {run / 'report.png'}", flush=True)
    print(f"\nmedians of {args.runs} round(s), threads: {args.threads or 'all'}\n"
          "| command | wall time | CPU time | val loss | tokens | load avg |\n|---|---:|---:|---:|---:|---:|")
    for config, rows in results.items():
        wall, cpu, loss, tokens, load = (statistics.median(column) for column in zip(*rows))
        name = Path(config).resolve()
        name = name.relative_to(ROOT) if name.is_relative_to(ROOT) else name
        print(f"| ling pretrain --config {name} | {wall:.1f} s | {cpu:.1f} s | {loss:.4f} | {tokens:,.0f} | {load:.1f} |")
    print("| nanoGPT CPU recipe (issue #3, not re-run) | 67 s | | 1.886 | 1,536,000 | |")

if __name__ == "__main__":
    main()
