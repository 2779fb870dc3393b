"""Requests per second of ling's lm-eval model (`LingLM`) against lm_eval's `HFLM`, on the same
local tasks and the same weights (a ling checkpoint and its `ling convert to-hf` export).

Three local tasks over tinyshakespeare, one per kind of request lm-eval makes:
- `mc`: multiple choice (loglikelihood), a ~100-token passage and 4 candidate next lines,
  as HellaSwag / ARC / MMLU ask;
- `rolling`: perplexity of whole passages longer than the window (loglikelihood_rolling),
  as wikitext asks;
- `gen`: greedy generation of up to 32 tokens until a blank line (generate_until), as GSM8K
  asks.
The requests are built by lm_eval from task YAML files (as `ling eval --tasks` does), then
each model answers the same list; rounds are interleaved (ling, HFLM, ling, ...) and the
median time is reported, with the largest difference between the two models' answers.
Rows: `ling` (contexts shared by several continuations run once into the KV cache),
`ling (whole rows)` (every request run whole, as HFLM does: what sharing the context buys),
`HFLM` (transformers, lm_eval's default model, with its one-token-continuation cache).

`--sweep` adds when sharing a context pays: 48 contexts of growing length with 4 random
~10-token continuations each, ling with its rule (`SHARE_BELOW`) against whole rows.

    PYTHONPATH=. python benchmarks/bench_lm_eval.py [--threads 1 --clock cpu] [--rounds 3] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval.tasks  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from benchmarks.machine import describe, header  # noqa: E402
from ling.checkpoint import save_model_dir  # noqa: E402
from ling.config import ModelConfig  # noqa: E402
from ling.eval.harness import LingLM  # noqa: E402
from ling.hf.convert import ToHFArgs, to_hf  # noqa: E402
from ling.model import build_model  # noqa: E402
from ling.tokenizer import Tokenizer  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
MODEL = dict(vocab_size=4096, context_length=256, n_layer=6, n_embd=384, n_head=6, n_kv_head=2, mlp="swiglu",
             mlp_hidden=1024, norm="rmsnorm", position="rope")
TASKS = {
    "mc": """task: bench_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    "rolling": """task: bench_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}]
""",
    "gen": """task: bench_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs: {{until: ["\\n\\n"], max_gen_toks: 32, do_sample: false}}
metric_list: [{{metric: exact_match}}]
""",
}


def write_data(text: str, root: Path, docs: int, seed: int = 0) -> None:
    """Task files over slices of `text`: passages with their true next line and 3 others."""
    rng = random.Random(seed)
    lines = [line for line in text.splitlines() if len(line) > 20]
    mc = []
    for _ in range(docs):
        start = rng.randrange(len(text) - 2000)
        end = text.index("\n", start + 400) + 1
        while text[end] == "\n":
            end += 1
        true = text[end: text.index("\n", end)]
        choices = [true] + rng.sample(lines, 3)
        rng.shuffle(choices)
        mc.append({"context": text[start:end], "choices": choices, "answer": choices.index(true)})
    rolling = [{"text": text[s: s + 2500]} for s in (rng.randrange(len(text) - 2500) for _ in range(docs // 3))]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc[: docs // 3]))
    (root / "rolling.jsonl").write_text("".join(json.dumps(d) + "\n" for d in rolling))
    for name, yaml in TASKS.items():
        (root / f"bench_{name}.yaml").write_text(yaml.format(data=root / f"{name}.jsonl"))


def make_model(text: str, root: Path) -> tuple[Path, Path]:
    tokenizer = Tokenizer.train_bpe([text], vocab_size=MODEL["vocab_size"],
                                    special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(**MODEL)).eval()
    save_model_dir(model, tokenizer, root / "ling")
    to_hf(ToHFArgs(str(root / "ling"), str(root / "hf"), overwrite=True))
    return root / "ling", root / "hf"


def requests(root: Path) -> dict[str, list]:
    manager = lm_eval.tasks.TaskManager(include_path=str(root), include_defaults=False)
    tasks = manager.load([f"bench_{name}" for name in TASKS])["tasks"]
    out = {}
    for name in TASKS:
        task = tasks[f"bench_{name}"]
        task.build_all_requests()
        out[name] = task.instances
    return out


CALLS = {"mc": "loglikelihood", "rolling": "loglikelihood_rolling", "gen": "generate_until"}


def difference(a: list, b: list) -> str:
    if isinstance(a[0], str):
        return f"{sum(x == y for x, y in zip(a, b))}/{len(a)} same"
    values = [x[0] if isinstance(x, tuple) else x for x in a], [y[0] if isinstance(y, tuple) else y for y in b]
    return f"{max(abs(x - y) for x, y in zip(*values)):.1e}"


def sweep(lm: LingLM, text: str, rounds: int, clock, seed: int = 0) -> None:
    """Contexts of growing length, 4 continuations each: the shared plan against whole rows."""
    rng = random.Random(seed)
    print("\n| context tokens (mean) | continuations | ling requests/s | whole rows requests/s | ling vs whole |")
    print("|---:|---:|---:|---:|---:|")
    for chars in (8, 30, 60, 120, 400):
        work = []
        for _ in range(48):
            start = rng.randrange(len(text) - 2000)
            for _ in range(4):
                other = rng.randrange(len(text) - 100)
                pair = (text[start: start + chars], " " + text[other: other + 40].strip())
                work.append(Instance("loglikelihood", {}, pair, len(work)))
        context = statistics.mean(len(lm.tok_encode(r.args[0])) for r in work)
        times = {True: [], False: []}
        for _ in range(rounds):
            for share in (True, False):
                lm.share_contexts = share
                begin = clock()
                lm.loglikelihood(work, disable_tqdm=True)
                times[share].append(clock() - begin)
        lm.share_contexts = True
        rate = {k: len(work) / statistics.median(v) for k, v in times.items()}
        print(f"| {context:.0f} | 4 | {rate[True]:.0f} | {rate[False]:.0f} | {rate[True] / rate[False]:.2f}x |",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=Path("../shared/data/tinyshakespeare.txt"))
    parser.add_argument("--docs", type=int, default=48, help="multiple-choice documents (4 requests each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu", help="cpu: process CPU time (with --threads 1)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ling-bench-lm-eval"))
    parser.add_argument("--sweep", action="store_true", help="add the context-length sweep of sharing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    transformers.logging.set_verbosity_error()
    args.dir.mkdir(parents=True, exist_ok=True)
    text = args.text.read_text(encoding="utf-8")
    write_data(text, args.dir, args.docs)
    ling_dir, hf_dir = make_model(text, args.dir)
    work = requests(args.dir)
    hf_dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    models = {
        "ling": LingLM(str(ling_dir), batch_size=args.batch_size, dtype=args.dtype),
        "ling (whole rows)": LingLM(str(ling_dir), batch_size=args.batch_size, dtype=args.dtype, share_contexts=False),
        "HFLM": HFLM(pretrained=str(hf_dir), device="cpu", dtype=hf_dtype, batch_size=args.batch_size),
    }
    print(header(describe()))
    print(f"- {args.threads} threads, {args.clock} clock, {args.dtype}, batch size {args.batch_size}, "
          f"lm_eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''}, transformers "
          f"{transformers.__version__}; model {MODEL['n_layer']}x{MODEL['n_embd']} llama-like, vocabulary "
          f"{MODEL['vocab_size']}, window {MODEL['context_length']}; median of {args.rounds} interleaved rounds\n")
    print("| task | requests | model | requests/s | vs HFLM | largest difference from HFLM |")
    print("|---|---:|---|---:|---:|---|")
    for name, instances in work.items():
        call = CALLS[name]
        times = {m: [] for m in models}
        answers = {}
        for _ in range(args.rounds):
            for model_name, lm in models.items():
                start = clock()
                answers[model_name] = getattr(lm, call)(instances, disable_tqdm=True)
                times[model_name].append(clock() - start)
        rates = {m: len(instances) / statistics.median(t) for m, t in times.items()}
        for model_name, rate in rates.items():
            print(f"| {name} ({call}) | {len(instances)} | {model_name} | {rate:.1f} | {rate / rates['HFLM']:.2f}x | "
                  f"{difference(answers[model_name], answers['HFLM'])} |", flush=True)
    print(f"<!-- ling kernels: {models['ling'].engine.kernels.summary()} -->")
    if args.sweep:
        sweep(models["ling"], text, args.rounds, clock)


if __name__ == "__main__":
    main()
