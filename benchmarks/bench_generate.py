"""Generation speed: ling's Engine vs transformers' `generate` (and llama.cpp), on the same weights, CPU.

Builds random-init transformers models once (GPT-2 6×384 with a 72-symbol character
vocabulary, like the pretraining benchmark's model; a Llama shaped as ling's `llama-110m`
preset; and one shaped as SmolLM2-135M: 30 narrow layers of 576, 9 heads / 3 kv heads),
saves them with `save_pretrained`, and loads the very same directory into both libraries
(ling converts it on load). Then, for fp32 and bf16 weights and batch 1 and 8,
interleaved round by round (ling, transformers, ling, ...):

- time to first token (TTFT): `max_new_tokens=1` on a 128-token prompt per row;
- prefill tokens/s: batch × prompt tokens / TTFT;
- decode tokens/s: batch × (N − 1) / (time for N new tokens − TTFT), N = 128, greedy,
  no early stop; medians over the rounds.

It also checks that both produce the same greedy tokens (fp32), and gives batch-1 decoding
as a share of the machine's bandwidth ceiling (measured read bandwidth / weight bytes: each
token reads every weight once). The table starts with the machine (`machine.py`). Run
from the repo root:

    PYTHONPATH=. python benchmarks/bench_generate.py [--rounds 3] [--models gpt-6x384 llama-110m smollm2-135m-shape]
        [--dtypes fp32 bf16] [--batches 1 8] [--threads 2] [--clock wall] [--compile] [--reference]
        [--llama-cpp DIR] [--text ../shared/data/tinyshakespeare.txt]

`--reference` adds a row for `--kernels reference` (the plain model). `--llama-cpp` adds
llama.cpp at batch 1 (its `llama-bench` in DIR, on the same weights exported by `ling
convert to-gguf`, f32 or bf16 as the row; the BPE models get a tokenizer trained on
`--text` for the export; the character-vocabulary GPT-2 has none, so no llama.cpp row).

`--clock cpu` times with this process's CPU time instead of the wall clock: with
`--threads 1` on a machine shared with other jobs, that approximates what an idle core would
give (a process waiting for its turn on the CPU does not accumulate CPU time).

`--compile` adds a ling row with `torch.compile` of the decode step; its compile time (the
warm-up) is measured and printed, and excluded from the rates. On CUDA it also adds
transformers compiled: `generate` with its static cache, which transformers compiles itself
(`mode="reduce-overhead"`, CUDA graphs, as ling's compiled engine on CUDA).

`--device cuda` runs both libraries on the GPU (the engine's KV cache sized to prompt + new
tokens, as transformers' static cache is); the header then describes the GPU, and the
bandwidth-ceiling column is left empty. `--smoke` is a seconds-long run of a 2-layer Llama
(one round, 8 tokens): a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from benchmarks.machine import describe, header
from ling.infer import Engine, SamplingParams

MODELS = {
    "gpt-6x384": lambda: GPT2Config(vocab_size=72, n_positions=1024, n_embd=384, n_layer=6, n_head=6,
                                    bos_token_id=0, eos_token_id=0),
    "llama-110m": lambda: LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2432, num_hidden_layers=12,
                                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2),
    "smollm2-135m-shape": lambda: LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                              num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                                              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}
MODELS["smoke-llama"] = lambda: LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                           rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_dir(name: str, root: Path, text: Path | None = None) -> Path:
    """The model's HF directory (random init, saved once). With `text`, a BPE model also gets
    a byte-level BPE tokenizer of its vocabulary size trained on it (padded with special
    tokens where the text gives fewer merges), so that it exports to GGUF for llama.cpp."""
    path = root / name
    config = MODELS[name]()
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    if text is not None and config.vocab_size >= 512 and not (path / "tokenizer.json").exists():
        from ling.tokenizer import Tokenizer

        tokenizer = Tokenizer.train_bpe([text.read_text()], vocab_size=config.vocab_size)
        missing = config.vocab_size - tokenizer.vocab_size
        tokenizer.add_special_tokens([f"<|unused_{i}|>" for i in range(missing)])
        tokenizer.save(path)
    return path


class HFRunner:
    """transformers' `generate`; `compile`: with its static cache, which it compiles on CUDA."""

    def __init__(self, path: Path, dtype: str, device: str = "cpu", compile: bool = False):
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
        self.device, self.extra = device, {"cache_implementation": "static"} if compile else {}

    def __call__(self, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
        prompts = prompts.to(self.device)
        with torch.inference_mode():
            out = self.model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **self.extra)
        return out[:, prompts.shape[1]:].tolist()


class LingRunner:
    def __init__(self, path: Path, dtype: str, batch: int, compile: bool = False, kernels: str = "auto",
                 device: str = "cpu", max_len: int | None = None):
        self.engine = Engine(path, dtype=dtype, max_batch_size=batch, compile=compile, kernels=kernels, device=device,
                             max_len=max_len)
        self.compile_s = None
        if compile:
            t0 = time.perf_counter()
            self.engine.warm_up()
            self.compile_s = time.perf_counter() - t0

    def __call__(self, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
        return [c.token_ids for c in self.engine.generate(prompts.tolist(), params)]


class LlamaCppRunner:
    """llama.cpp's `llama-bench` on the GGUF of the same weights (batch 1: it decodes one sequence).
    It reports its own rates: `timed` uses them instead of a clock."""

    def __init__(self, bench: Path, gguf: Path, threads: int):
        self.bench, self.gguf, self.threads = bench, gguf, threads

    def rates(self, prompt_tokens: int, new_tokens: int) -> dict:
        out = subprocess.run([str(self.bench), "-m", str(self.gguf), "-p", str(prompt_tokens), "-n", str(new_tokens),
                              "-t", str(self.threads), "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
        tests = json.loads(out.stdout)
        return {("decode" if t["n_gen"] else "prefill"): t["avg_ts"] for t in tests}


def gguf_of(hf_path: Path, dtype: str) -> Path:
    """The HF directory as a GGUF file, by `ling convert to-gguf` (once)."""
    out = hf_path.with_name(f"{hf_path.name}-{dtype}.gguf")
    if not out.exists():
        subprocess.run([sys.executable, "-m", "ling", "convert", "to-gguf", str(hf_path), str(out),
                        "--dtype", {"fp32": "f32", "bf16": "bf16"}[dtype]], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(run, prompts, new_tokens):
    start = clock()
    out = run(prompts, new_tokens)
    return clock() - start, out


def bench(runners: dict, prompts: torch.Tensor, new_tokens: int, rounds: int, warm_tokens: int = 8) -> dict:
    """Interleaved rounds; per runner: medians of TTFT and of the N-token time; last outputs.
    The warm-up generates `warm_tokens` (on a GPU all N: a static cache is sized by the longest)."""
    for run in runners.values():  # warm-up
        if not isinstance(run, LlamaCppRunner):
            run(prompts, warm_tokens)
    times = {name: {"ttft": [], "total": [], "decode": [], "prefill": []} for name in runners}
    outputs = {}
    B, P = prompts.shape
    for _ in range(rounds):
        for name, run in runners.items():
            if isinstance(run, LlamaCppRunner):
                rates = run.rates(P, new_tokens)
                times[name]["decode"].append(rates["decode"])
                times[name]["prefill"].append(rates["prefill"])
                continue
            times[name]["ttft"].append(timed(run, prompts, 1)[0])
            seconds, outputs[name] = timed(run, prompts, new_tokens)
            times[name]["total"].append(seconds)
    results = {}
    for name, t in times.items():
        if t["decode"]:
            decode, prefill = statistics.median(t["decode"]), statistics.median(t["prefill"])
            results[name] = {"ttft_ms": 1000 * P / prefill, "prefill_tok_s": prefill, "decode_tok_s": decode, "tokens": None}
            continue
        ttft, total = statistics.median(t["ttft"]), statistics.median(t["total"])
        results[name] = {
            "ttft_ms": 1000 * ttft,
            "prefill_tok_s": B * P / ttft,
            "decode_tok_s": B * (new_tokens - 1) / max(total - ttft, 1e-9),
            "tokens": outputs[name],
        }
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "smoke-llama"], choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="cpu: process CPU time (use with --threads 1)")
    parser.add_argument("--compile", action="store_true", help="add a ling row with torch.compile")
    parser.add_argument("--reference", action="store_true", help="add a ling row with --kernels reference")
    parser.add_argument("--llama-cpp", type=Path, help="directory of llama.cpp's llama-bench: add llama.cpp at batch 1")
    parser.add_argument("--text", type=Path, default=Path("../shared/data/tinyshakespeare.txt"),
                        help="text to train the BPE tokenizers the GGUF exports need")
    parser.add_argument("--dir", default="/tmp/ling-bench-generate", help="where the HF models are saved")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.batches, args.rounds, args.prompt_tokens, args.new_tokens = ["smoke-llama"], [1, 2], 1, 8, 8
    on_gpu = args.device == "cuda"
    if on_gpu and (args.clock == "cpu" or args.llama_cpp is not None):
        parser.error("--device cuda takes the wall clock, without --llama-cpp (a CPU program)")
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    transformers.logging.set_verbosity_error()
    if on_gpu:
        from benchmarks.machine import describe_gpu

        machine = None
        print(describe_gpu())
    else:
        machine = describe()
        print(header(machine))
    print(f"- {args.threads} threads, {args.clock} clock, transformers {transformers.__version__}; prompt "
          f"{args.prompt_tokens} tokens/row, {args.new_tokens} new tokens, greedy, median of {args.rounds}\n")
    print("| model | dtype | batch | engine | decode tok/s | prefill tok/s | TTFT ms | decode vs HF | "
          "of bandwidth ceiling | same tokens |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---|", flush=True)
    max_len = args.prompt_tokens + args.new_tokens if on_gpu else None
    warm_tokens = args.new_tokens if on_gpu else 8
    for model in args.models:
        path = hf_dir(model, Path(args.dir), args.text if args.llama_cpp is not None else None)
        config = MODELS[model]()
        vocab = config.vocab_size
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        for dtype in args.dtypes:
            hf = HFRunner(path, dtype, args.device)
            hf_compiled = HFRunner(path, dtype, args.device, compile=True) if args.compile and on_gpu else None
            ceiling = machine["read_bytes_per_s"] / (params * DTYPES[dtype].itemsize) if machine else None  # tok/s, 1 row
            for batch in args.batches:
                generator = torch.Generator().manual_seed(batch)
                prompts = torch.randint(3, vocab, (batch, args.prompt_tokens), generator=generator)
                runners = {"ling": LingRunner(path, dtype, batch, device=args.device, max_len=max_len)}
                if args.reference:
                    runners["ling (reference)"] = LingRunner(path, dtype, batch, kernels="reference", device=args.device,
                                                             max_len=max_len)
                if args.compile:
                    runners["ling (compile)"] = LingRunner(path, dtype, batch, compile=True, device=args.device,
                                                           max_len=max_len)
                    print(f"<!-- {model} {dtype} batch {batch}: compiled in "
                          f"{runners['ling (compile)'].compile_s:.1f} s -->", flush=True)
                runners["transformers"] = hf
                if hf_compiled is not None:
                    runners["transformers (compile)"] = hf_compiled
                if args.llama_cpp is not None and batch == 1 and (path / "tokenizer.json").exists():
                    runners["llama.cpp"] = LlamaCppRunner(args.llama_cpp / "llama-bench", gguf_of(path, dtype),
                                                          args.threads)
                results = bench(runners, prompts, args.new_tokens, args.rounds, warm_tokens)
                reference = results["transformers"]
                for name, r in results.items():
                    ratio = r["decode_tok_s"] / reference["decode_tok_s"]
                    same = "-" if r["tokens"] is None else "yes" if r["tokens"] == reference["tokens"] else "no"
                    share = f"{r['decode_tok_s'] / ceiling:.0%}" if batch == 1 and ceiling else ""
                    print(f"| {model} | {dtype} | {batch} | {name} | {r['decode_tok_s']:.0f} | "
                          f"{r['prefill_tok_s']:.0f} | {r['ttft_ms']:.1f} | {ratio:.2f}x | {share} | {same} |", flush=True)
                if batch == max(args.batches):
                    print(f"<!-- {model} {dtype}: {runners['ling'].engine.kernels.summary()} -->", flush=True)


if __name__ == "__main__":
    main()
