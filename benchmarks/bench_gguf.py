"""GGUF export: time and file size per dtype, and what each quantisation costs in perplexity.

    python benchmarks/bench_gguf.py [--data ../shared/data/tinyshakespeare.txt] [--minutes 5] [--rounds 3]
                                    [--out runs/bench-gguf] [--llama-cpp /path/to/llama.cpp/build/bin]

1. A model worth measuring: the text is prepared with a 2048-entry byte-level BPE
   (`ling prepare --tokenizer bpe`) and a small Llama-shaped model (4 layers × 256, GQA,
   SwiGLU, RMSNorm, RoPE) is pretrained on it for `--minutes`. Both are kept in `--out`
   and reused by later runs.
2. Export cost, for `llama-110m` (random weights — time and size do not depend on them):
   `ling convert to-gguf` once per dtype per round, interleaved, median wall time (loading
   the checkpoint included, as a user runs it) and file size.
3. Quality: validation perplexity (`ling eval` on the dataset's val split) of the trained
   model, and of its f16, q8_0 and q4_0 exports read back with `ling convert from-gguf`
   (as fp32, so the numbers are those of the weights in the file).
4. With `--llama-cpp DIR` (a llama.cpp build's bin/ directory): llama.cpp's own numbers on
   the same files — greedy text from `llama-simple` against ling's greedy text from the
   same GGUF, and `llama-perplexity` on the val text (its windows differ from ling's, so
   compare its column with itself).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars off: the tables are the output

import torch  # noqa: E402

from ling.checkpoint import load_checkpoint, save_model_dir  # noqa: E402
from ling.config import ModelConfig  # noqa: E402
from ling.data.dataset import open_dataset  # noqa: E402
from ling.data.prepare import PrepareArgs, prepare  # noqa: E402
from ling.device import pick_precision  # noqa: E402
from ling.eval.evaluate import EvalArgs, evaluate  # noqa: E402
from ling.gguf.convert import FromGGUFArgs, ToGGUFArgs, from_gguf, to_gguf  # noqa: E402
from ling.infer.generate import generate_tokens  # noqa: E402
from ling.model import build_model  # noqa: E402
from ling.quickstart import seconds_per_step  # noqa: E402
from ling.train.config import TrainConfig  # noqa: E402
from ling.train.pretrain import PretrainArgs, run_pretraining  # noqa: E402

DTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]
QUALITY_DTYPES = ["f16", "q8_0", "q4_0"]
MODEL = ModelConfig(name="bench-gguf", context_length=256, n_layer=4, n_embd=256, n_head=4, n_kv_head=2,
                    mlp="swiglu", mlp_hidden=704, norm="rmsnorm", position="rope", tie_embeddings=True)
TRAIN = TrainConfig(batch_tokens=16 * 256, micro_batch=16, lr=2e-3, min_lr=2e-4, warmup_steps=50, eval_batches=8,
                    log_every=20, keep_last=1)
PROMPT = "ROMEO:\n"


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def trained_model(data: Path, out: Path, minutes: float) -> Path:
    """Prepare the text and pretrain the small Llama-shaped model (reused when already there)."""
    data_dir, run = out / "data", out / "run"
    if not (data_dir / "meta.json").exists():
        quiet(prepare, PrepareArgs(input=[str(data)], output=str(data_dir), tokenizer="bpe", vocab_size=2048))
    if (run / "best").exists():
        print(f"using the model trained earlier in {run}")
        return run / "best"
    tokens = open_dataset(data_dir)
    args = PretrainArgs(data=str(data_dir), out=str(run), device="cpu",
                        model=dataclasses.replace(MODEL, vocab_size=tokens.tokenizer.vocab_size),
                        train=dataclasses.replace(TRAIN, precision=pick_precision("auto", torch.device("cpu"))))
    step_s = seconds_per_step(args, tokens.train, torch.device("cpu"), args.train.precision, budget_s=5.0)
    steps = max(50, int(minutes * 60 / step_s))
    args.train = dataclasses.replace(args.train, max_steps=steps, time_limit=minutes * 1.1, eval_every=max(50, steps // 5))
    print(f"training {steps} steps (~{minutes:g} min) of a {build_model(args.model, 'meta', init=False).num_params() / 1e6:.1f}M"
          f"-parameter Llama-shaped model on {data.name} ...")
    result = run_pretraining(args, show_summary=False)
    print(f"trained: {result.tokens_seen:,} tokens, val loss {result.best_val_loss:.3f}")
    return run / "best"


def export_cost(tokenizer_dir: Path, out: Path, rounds: int) -> list[tuple[str, float, int, int]]:
    """(dtype, median seconds, bytes, parameters) of `ling convert to-gguf` for llama-110m."""
    ckpt = out / "llama-110m"
    if not ckpt.exists():
        _, tokenizer = load_checkpoint(tokenizer_dir)
        save_model_dir(build_model(ModelConfig.from_name("llama-110m")), tokenizer, ckpt)
    n_params = build_model(ModelConfig.from_name("llama-110m"), "meta", init=False).num_params()
    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    for _ in range(rounds):
        for dtype in DTYPES:
            start = time.perf_counter()
            quiet(to_gguf, ToGGUFArgs(str(ckpt), str(out / f"llama-110m-{dtype}.gguf"), dtype=dtype, overwrite=True))
            times[dtype].append(time.perf_counter() - start)
    return [(d, statistics.median(times[d]), (out / f"llama-110m-{d}.gguf").stat().st_size, n_params) for d in DTYPES]


def perplexity(ckpt: Path, data_dir: Path) -> float:
    return quiet(evaluate, EvalArgs(str(ckpt), data=str(data_dir), device="cpu", precision="fp32"))["perplexity"]


def greedy_text(path: Path, n: int) -> str:
    model, tokenizer = load_checkpoint(path, dtype="fp32")
    prompt = tokenizer.encode(PROMPT)
    ids = list(generate_tokens(model.eval(), prompt, n, temperature=0.0))
    return tokenizer.decode(prompt + ids)


def llama_cpp(bin_dir: Path, gguf: Path, val_text: Path, n: int) -> tuple[str, float | None]:
    """(greedy text of llama-simple, llama-perplexity's final estimate) for one file."""
    simple = subprocess.run([str(bin_dir / "llama-simple"), "-m", str(gguf), "-n", str(n), PROMPT],
                            capture_output=True, text=True, timeout=600)
    ppl = None
    if (bin_dir / "llama-perplexity").exists():
        # Its logger writes from a thread that, in the build measured, lost the last lines at
        # exit (the result among them) in about half the runs: run again when it is missing.
        for _ in range(6):
            run = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(val_text), "-c", "256",
                                  "-b", "256"], capture_output=True, text=True, timeout=1800)
            match = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
            if match is not None:
                ppl = float(match.group(1))
                break
        else:
            print(f"llama-perplexity on {gguf.name} gave no result (exit status {run.returncode}):\n"
                  f"{(run.stdout + run.stderr)[-600:]}")
    return simple.stdout, ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-gguf")
    parser.add_argument("--llama-cpp", default=None, help="a llama.cpp build's bin/ (llama-simple, llama-perplexity)")
    parser.add_argument("--greedy-tokens", type=int, default=48)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")

    best = trained_model(Path(args.data), out, args.minutes)

    print("\nexport (`ling convert to-gguf`), llama-110m:\n")
    print("| dtype | time (s) | file size | bits / parameter |\n|---|---:|---:|---:|")
    for dtype, seconds, size, n_params in export_cost(best, out, args.rounds):
        print(f"| {dtype} | {seconds:.1f} | {size / 1e6:.1f} MB | {8 * size / n_params:.2f} |")

    data_dir = out / "data"
    rows = [("original (ling checkpoint, fp32)", best, None)]
    for dtype in QUALITY_DTYPES:
        gguf = out / f"model-{dtype}.gguf"
        quiet(to_gguf, ToGGUFArgs(str(best), str(gguf), dtype=dtype, overwrite=True))
        back = out / f"from-gguf-{dtype}"
        quiet(from_gguf, FromGGUFArgs(str(gguf), str(back), dtype="fp32", overwrite=True))
        rows.append((f"{dtype} → from-gguf", back, gguf))
    val_text = out / "val.txt"
    dataset = open_dataset(data_dir)
    val_text.write_text(dataset.tokenizer.decode(dataset.val.tolist()))
    base = perplexity(best, data_dir)
    header = "| model | file size | val perplexity | vs original |"
    if args.llama_cpp:
        header += " llama.cpp greedy = ling's | llama-perplexity |"
    print(f"\nvalidation perplexity ({data_dir.name}, {len(dataset.val):,} tokens), `ling eval`:\n\n{header}")
    print("|---|---:|---:|---:|" + ("---|---:|" if args.llama_cpp else ""))
    llama_text = {}
    for label, ckpt, gguf in rows:
        ppl = base if gguf is None else perplexity(ckpt, data_dir)
        size = f"{gguf.stat().st_size / 1e6:.1f} MB" if gguf else f"{(ckpt / 'model.safetensors').stat().st_size / 1e6:.1f} MB"
        line = f"| {label} | {size} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |"
        if args.llama_cpp and gguf is not None:
            theirs, llama_ppl = llama_cpp(Path(args.llama_cpp), gguf, val_text, args.greedy_tokens)
            llama_text[gguf.name] = theirs
            ours = greedy_text(gguf, args.greedy_tokens)
            theirs = theirs.removesuffix("\n")  # llama-simple ends its output with a newline
            same = "yes" if theirs == ours else f"no: the first {len(os.path.commonprefix([theirs, ours]))} characters agree"
            line += f" {same} | {llama_ppl if llama_ppl is not None else '—'} |"
        elif args.llama_cpp:
            line += " | |"
        print(line)
    if args.llama_cpp:
        print(f"\ngreedy continuation of {PROMPT!r} from the q8_0 file (llama.cpp):\n")
        print(llama_text["model-q8_0.gguf"])


if __name__ == "__main__":
    main()
