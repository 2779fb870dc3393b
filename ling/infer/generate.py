"""Generation entry points: `generate_tokens` for code holding a model, and `ling generate`.

`generate_tokens` is the small path for a model in memory (the trainer's samples before and
after training): it runs the `Engine` with a one-row cache sized to the request and leaves
the model in the train/eval mode it found it in. `ling generate` continues one prompt, or
runs a file of prompts in batches and writes JSONL.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional, TextIO

import tyro
from tqdm import tqdm

from ling.atomic import atomic_file
from ling.checkpoint import load_checkpoint, resolve_dtype
from ling.dataclass_io import from_dict
from ling.device import pick_device, pick_precision
from ling.errors import LingError
from ling.infer.engine import Completion, Engine
from ling.infer.sampling import SamplingParams
from ling.kernels import check_mode, compile_decision
from ling.model import Transformer


def generate_tokens(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled token ids after `prompt` (the last may be a stop id).

    Generation also ends when prompt + output fill the model's context; a prompt that
    already fills it is a `LingError`."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
        top_p=1.0 if top_p is None else top_p, seed=seed, stop_token_ids=list(stop_ids),
    )
    was_training = model.training
    try:
        engine = Engine(model, max_batch_size=1, max_len=len(prompt) + max(max_new_tokens, 1))
        for _, delta in engine.stream([prompt], params):
            yield from delta.token_ids
    finally:
        model.train(was_training)


# ---- `ling generate` -------------------------------------------------------------------
@dataclass
class ModelArgs:
    """Which model to run, where, and how (shared by `ling generate` and `ling chat`)."""

    ckpt: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CKPT")]
    """checkpoint: a ling or Hugging Face directory, or a GGUF file"""
    device: str = "auto"
    """cpu, cuda, mps, ... (auto: cuda > mps > cpu)"""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """weights and cache precision (auto: bf16 where the hardware has it, else fp32)"""
    compile: bool = False
    """torch.compile the decode step (faster steps after seconds to minutes of compiling): `ling
    generate` compiles only where the saving measured on this machine beats the compile time"""
    draft: Optional[str] = None
    """a small checkpoint with the same tokenizer for speculative decoding (greedy only)"""
    kernels: str = "auto"
    """fast paths: auto = time the candidates on this machine and keep the fastest (the summary
    says which); reference = the plain model (ling/model.py) as it is"""

    def __post_init__(self):
        check_mode(self.kernels)


@dataclass
class GenerateArgs(ModelArgs):
    """Generate text from a checkpoint: one prompt, or a file of prompts in batches."""

    prompt: Optional[str] = None
    """the text to continue"""
    prompts_file: Optional[str] = None
    """one prompt per line, or JSONL ({"prompt": ..., plus any sampling field to override})"""
    batch_size: int = 8
    """prompts decoded together (more are queued and join as others finish)"""
    output: Optional[str] = None
    """write the JSONL results here instead of stdout"""
    stream: bool = False
    """print text as it is generated (with --prompts-file: each result as soon as it is done)"""
    sampling: tyro.conf.OmitArgPrefixes[SamplingParams] = field(default_factory=SamplingParams)


def build_engine(args: ModelArgs, max_batch_size: int, decode_steps: int | None = None) -> Engine:
    """The engine for `args`. With `--compile` and a request of about `decode_steps` steps, the
    decode step is compiled only if that pays here (`ling.kernels.compile_decision`); a
    compiled engine compiles before it returns, and says how long that took."""
    device = pick_device(args.device)
    dtype = pick_precision("auto", device) if args.dtype == "auto" else args.dtype
    draft = None
    if args.draft is not None:
        draft = Engine(args.draft, device=device, dtype=dtype, max_batch_size=max_batch_size, kernels=args.kernels)
    compile = args.compile
    if compile and decode_steps is not None and args.kernels == "auto" and draft is None:
        model, tokenizer = load_checkpoint(args.ckpt, device=device, dtype=resolve_dtype(dtype))
        key = compile_decision.shape_key(model.cfg, next(model.parameters()).dtype, max_batch_size)
        compile, why = compile_decision.decide(device, key, decode_steps)
        print(f"--compile: {why}", file=sys.stderr)
        engine = Engine(model, tokenizer, max_batch_size=max_batch_size, compile=compile, kernels=args.kernels,
                        owns_model=True)
    else:
        engine = Engine(args.ckpt, device=device, dtype=dtype, max_batch_size=max_batch_size, compile=compile,
                        kernels=args.kernels, draft=draft)
    if engine.compiled:
        print("compiling the decode step ...", file=sys.stderr, flush=True)
        engine.warm_up()
        print(f"compiled in {engine.compile_seconds:.1f} s", file=sys.stderr, flush=True)
    return engine


def read_prompts(path: str, defaults: SamplingParams) -> list[tuple[str, SamplingParams, str]]:
    """(prompt, params, "file:line") for each prompt of a text file (one per line) or a JSONL
    file (a "prompt" and any sampling overrides per line)."""
    file = Path(path)
    if not file.exists():
        raise LingError(f"{path}: no such prompts file")
    lines = file.read_text(encoding="utf-8").splitlines()
    is_jsonl = file.suffix == ".jsonl" or next((ln.lstrip().startswith("{") for ln in lines if ln.strip()), False)
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if not is_jsonl:
            prompts.append((line, defaults, where))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LingError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise LingError(f'{where}: each line needs a "prompt" string')
        overrides = {k: v for k, v in record.items() if k != "prompt"}
        prompts.append((record["prompt"], from_dict(SamplingParams, overrides, where=where, partial_base=defaults), where))
    if not prompts:
        raise LingError(f"{path}: no prompts in the file")
    return prompts


def result_record(index: int, prompt: str, completion: Completion) -> dict:
    record = {
        "index": index, "prompt": prompt, "text": completion.text, "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids),
    }
    if completion.logprobs:
        record["logprobs"] = [
            {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
            for lp in completion.logprobs
        ]
    return record


def generate(args: GenerateArgs) -> None:
    if (args.prompt is None) == (args.prompts_file is None):
        raise LingError("give exactly one of --prompt TEXT or --prompts-file FILE")
    if args.batch_size < 1:
        raise LingError("--batch-size must be at least 1")
    if args.prompt is not None:
        engine = build_engine(args, max_batch_size=1, decode_steps=args.sampling.max_new_tokens)
        if engine.tokenizer is None:
            raise LingError(f"{args.ckpt}: no tokenizer.json, so text prompts cannot be encoded")
        generate_one(engine, args.prompt, args.sampling, args.stream)
        engine.record_speed()
    else:
        prompts = read_prompts(args.prompts_file, args.sampling)
        rows = min(args.batch_size, len(prompts))
        steps = -(-len(prompts) // rows) * max(params.max_new_tokens for _, params, _ in prompts)
        engine = build_engine(args, max_batch_size=rows, decode_steps=steps)
        if args.output is None:
            generate_many(engine, prompts, sys.stdout, args.stream)
        else:
            with atomic_file(args.output) as out:
                generate_many(engine, prompts, out, args.stream)
            print(f"wrote {len(prompts)} results to {args.output}", file=sys.stderr)
    engine.record_speed()


def generate_one(engine: Engine, prompt: str, params: SamplingParams, stream: bool) -> None:
    """Print the prompt and its continuation (as it comes with `stream`), then a summary."""
    start = time.perf_counter()
    print(prompt, end="", flush=True)
    tokens = slides = 0
    for _, delta in engine.stream([prompt], params):
        tokens += len(delta.token_ids)
        slides += delta.slid
        print(delta.text, end="", flush=stream)
    print(flush=True)
    elapsed = time.perf_counter() - start
    print(f"[{tokens} tokens in {elapsed:.2f} s, {tokens / elapsed:.1f} tokens/s{speculation_note(engine)}]\n"
          f"{slide_note(engine, slides)}[{engine.kernels.summary()}]", file=sys.stderr)


def slide_note(engine: Engine, slides: int, prompts: int | None = None) -> str:
    """A summary line saying that generation went past the context, or ''."""
    if not slides:
        return ""
    who = "" if prompts is None else f"{prompts} prompt(s) "
    return (f"[{who}went past the context ({engine.max_len} tokens) in a sliding window: {slides} time(s) the "
            f"most recent {engine.slide_keep} tokens were kept and generation went on from them]\n")


def generate_many(engine: Engine, prompts: list[tuple[str, SamplingParams, str]], out: TextIO, stream: bool) -> None:
    """Batched generation for every prompt; one JSONL result per prompt, in input order
    (with `stream`, in the order they finish)."""
    texts = [p for p, _, _ in prompts]
    params = [sp for _, sp, _ in prompts]
    ids = [engine.encode_prompt(p) for p in texts]
    for (_, sp, where), prompt_ids in zip(prompts, ids):
        try:
            engine.check(prompt_ids, sp)
        except LingError as e:
            raise LingError(f"{where}: {e}") from None
    parts: list[list] = [[] for _ in prompts]
    results: list[dict | None] = [None] * len(prompts)
    start, tokens, slides, slid_prompts = time.perf_counter(), 0, 0, set()
    with tqdm(total=len(prompts), unit="prompt", file=sys.stderr, disable=None) as bar:
        for i, delta in engine.stream(ids, params):
            parts[i].append(delta)
            tokens += len(delta.token_ids)
            if delta.slid:
                slides += 1
                slid_prompts.add(i)
            if delta.finish_reason is None:
                continue
            results[i] = result_record(i, texts[i], Completion.from_deltas(parts[i], len(ids[i])))
            if stream:
                out.write(json.dumps(results[i], ensure_ascii=False) + "\n")
                out.flush()
            bar.update(1)
    if not stream:
        for record in results:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elapsed = time.perf_counter() - start
    print(f"{len(prompts)} prompts, {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tokens/s"
          f"{speculation_note(engine)})\n{slide_note(engine, slides, len(slid_prompts))}{engine.kernels.summary()}",
          file=sys.stderr)


def speculation_note(engine: Engine) -> str:
    proposed = engine.speculation["proposed"]
    if engine.draft is None or not proposed:
        return ""
    return f", draft tokens accepted: {100 * engine.speculation['accepted'] / proposed:.0f}%"
