"""`ling sweep` on tinyshakespeare, character-level, with a shortened
`configs/shakespeare-char-cpu.yaml` (the recipe's model; fewer, smaller steps):

1. the recipe's defaults (lr 3e-3, weight decay 0.1, warmup 5% of the steps) as one run;
2. a 16-trial TPE sweep over lr, warmup and weight decay without pruning;
3. the same sweep (same sampler seed) with the median pruner.

Reports each one's best validation loss (the sweep's metric: the best evaluation of a run),
the training steps spent, and the wall time. The two sweeps run at the same time (the
comparison is in steps, which the load does not change).

    PYTHONPATH=. python benchmarks/bench_sweep.py [--text ../shared/data/tinyshakespeare.txt] [--steps 30]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def base_config(data: Path, steps: int, batch_tokens: int, eval_every: int) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "shakespeare-char-cpu.yaml").read_text())
    config["train"].update(max_steps=steps, batch_tokens=batch_tokens, micro_batch=batch_tokens // 64,
                           warmup_steps=max(1, round(steps * 100 / 2000)), eval_every=eval_every,
                           eval_batches=8, log_every=eval_every, keep_last=1)
    return {"data": str(data), "device": "cpu", "kernels": "reference", **config}


def best_val(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return min(r["val_loss"] for r in records if r["kind"] == "eval")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--work", default=tempfile.gettempdir())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ling-bench-sweep-", dir=args.work))
    data = Path(args.work) / "ling-bench-shakespeare-char"
    ling = [sys.executable, "-m", "ling"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not (data / "meta.json").exists():
        subprocess.run(ling + ["prepare", "--input", args.text, "--tokenizer", "char", "--output", str(data)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    base = base_config(data, args.steps, args.batch_tokens, args.eval_every)
    (work / "base.yaml").write_text(yaml.safe_dump({**base, "out": str(work / "default")}, sort_keys=False))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(ling + ["pretrain", "--config", str(work / "base.yaml")], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = [("recipe defaults (1 run)", best_val(work / "default"), args.steps, time.perf_counter() - t0)]
    procs = {}
    for pruner in ("none", "median"):
        sweep = {"command": "pretrain", "out": str(work / f"sweep-{pruner}"), "base": str(work / "base.yaml"),
                 "space": {"train.lr": {"float": [3.0e-4, 3.0e-2], "log": True},
                           "train.warmup_steps": {"int": [0, args.steps // 3]},
                           "train.weight_decay": {"float": [0.0, 0.3]}},
                 "trials": args.trials, "metric": "val_loss", "direction": "minimize", "pruner": pruner,
                 "sampler": "tpe", "seed": 0, "workers": 1}
        (work / f"sweep-{pruner}.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
        log = open(work / f"sweep-{pruner}.log", "w")
        procs[pruner] = (subprocess.Popen(ling + ["sweep", "--config", str(work / f"sweep-{pruner}.yaml")], env=env,
                                          stdout=log, stderr=subprocess.DEVNULL), time.perf_counter())
    ended = {}
    while len(ended) < len(procs):  # each sweep's own wall time, whichever ends first
        for pruner, (proc, start) in procs.items():
            if pruner not in ended and proc.poll() is not None:
                ended[pruner] = time.perf_counter() - start
        time.sleep(0.5)
    for pruner, (proc, start) in procs.items():
        if proc.returncode != 0:
            sys.exit(f"the {pruner} sweep failed: see {work / f'sweep-{pruner}.log'}")
        with open(work / f"sweep-{pruner}" / "trials.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        done = [float(r["val_loss"]) for r in rows if r["state"] == "complete"]
        states = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail")}
        results.append((f"TPE, {len(rows)} trials, pruner {pruner} ({states['complete']} complete, "
                        f"{states['pruned']} pruned, {states['fail']} failed)", min(done),
                        sum(int(r["steps"]) for r in rows), ended[pruner]))
    print(f"work: {work} · load average {load:.1f} at the start\n")
    print("| run | best val loss | training steps | wall time |\n|---|---:|---:|---:|")
    for name, val, steps, seconds in results:
        print(f"| {name} | {val:.4f} | {steps:,} | {seconds:.0f} s |")
    (_, default, _, _), (_, full, full_steps, _), (_, pruned, pruned_steps, _) = results
    print(f"\nsweep vs defaults: {full:.4f} vs {default:.4f} ({(full - default) / default:+.2%}); "
          f"median pruner: {pruned_steps / full_steps:.1%} of the steps, best val {pruned:.4f} "
          f"({(pruned - full) / full:+.2%} vs no pruner)")


if __name__ == "__main__":
    main()
