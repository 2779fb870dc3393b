"""Peak memory while loading a Hugging Face checkpoint: ling vs transformers' from_pretrained.

Creates (once) a random-init Llama-shaped checkpoint of ~675 MB (fp32) under /tmp, plus a
sharded copy, then loads it in fresh subprocesses, one per case, interleaved:
  ling load_checkpoint  vs  transformers AutoModelForCausalLM.from_pretrained,
as stored (fp32) and converting to bf16. Each child resets its peak-RSS counter after its
imports and a warm-up load of a tiny checkpoint, so the figure is what loading *this*
checkpoint costs, not the interpreter, torch's code pages or first-use allocations.
transformers memory-maps fp32 weights without reading them, so its peak while loading is
low and the cost comes when the weights are first read: the next column shows RSS once
every weight has been read (a forward pass would do the same).

    PYTHONPATH=. python benchmarks/hf_load_memory.py [--dir /tmp/ling-hf-bench] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import gc, json, sys, time, torch
torch.set_num_threads(2)
loader, path, warmup, dtype = sys.argv[1:5]
if loader == "ling":
    from ling.checkpoint import load_checkpoint
    load = lambda p: load_checkpoint(p, dtype=None if dtype == "stored" else dtype)[0]
else:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype="auto" if dtype == "stored" else torch.bfloat16)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

load(warmup)  # a tiny checkpoint first: imports and library code pages are not what we measure
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
start = time.perf_counter()
model = load(path)
seconds = time.perf_counter() - start
peak = status("VmHWM:")
with torch.no_grad():  # lazily mapped weights become resident only when read
    for p in model.parameters():
        p.sum()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": peak, "touched": status("VmRSS:"), "weights": weights,
                  "seconds": seconds}))
"""


def make_checkpoint(directory: Path) -> None:
    """~168M parameters: hidden 1024, 8 layers, vocab 32000, untied head — 675 MB in fp32."""
    if (directory / "single" / "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory / "single", max_shard_size="10GB")
    model.save_pretrained(directory / "sharded", max_shard_size="200MB")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size = 64, 128, 1, 1000
    LlamaForCausalLM(config).save_pretrained(directory / "warmup")


def run_child(loader: str, path: Path, dtype: str) -> dict:
    for file in path.glob("*.safetensors"):  # same page-cache state for everyone: warm
        file.read_bytes()
    warmup = path.parent / "warmup"
    proc = subprocess.run([sys.executable, "-c", CHILD, loader, str(path), str(warmup), dtype],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/ling-hf-bench")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    directory = Path(args.dir)
    make_checkpoint(directory)
    size = sum(f.stat().st_size for f in (directory / "single").glob("*.safetensors"))
    cases = [("ling", "single", "stored"), ("transformers", "single", "stored"),
             ("ling", "sharded", "stored"), ("transformers", "sharded", "stored"),
             ("ling", "single", "bf16"), ("transformers", "single", "bf16")]
    results: dict[tuple, list[dict]] = {case: [] for case in cases}
    for _ in range(args.repeat):
        for case in cases:  # interleaved, so machine noise hits both loaders alike
            results[case].append(run_child(case[0], directory / case[1], case[2]))

    print(f"checkpoint: {directory}/single, {size / 1e6:.0f} MB of fp32 safetensors "
          f"(sharded copy: 200 MB shards); {platform.machine()}, torch threads 2, {time.strftime('%Y-%m-%d')}")
    print("| loader | checkpoint | load dtype | weights (MB) | peak while loading (MB) | peak / weights "
          "| resident once every weight is read (MB) | load time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for (loader, layout, dtype), runs in results.items():
        best = min(runs, key=lambda r: r["peak"] - r["before"])
        extra, touched = best["peak"] - best["before"], best["touched"] - best["before"]
        print(f"| {loader} | {layout} | {'as stored (fp32)' if dtype == 'stored' else dtype} | "
              f"{best['weights'] / 1e6:.0f} | {extra / 1e6:.0f} | {extra / best['weights']:.2f}× | "
              f"{touched / 1e6:.0f} | {min(r['seconds'] for r in runs):.2f} |")


if __name__ == "__main__":
    main()
