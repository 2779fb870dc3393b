"""`ling quickstart`: the whole path in a few minutes, offline — prepare the builtin corpus,
pretrain a small character-level model for a bounded time, and show what it learned.

The learning-rate schedule needs to know how many steps there will be, so the quickstart
first times a few training steps on this machine and sizes the run to the time budget
(`train.time_limit` still stops it if the machine slows down).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ling.checkpoint import load_checkpoint
from ling.config import ModelConfig
from ling.data.dataset import open_dataset
from ling.data.prepare import PrepareArgs, prepare
from ling.data.sampler import PretrainSampler, validation_batches
from ling.device import pick_device, pick_precision
from ling.errors import LingError
from ling.infer.generate import generate_tokens
from ling.kernels import check_mode
from ling.model import build_model
from ling.train.config import TrainConfig
from ling.train.pretrain import PretrainArgs, run_pretraining
from ling.train.trainer import Trainer

# A small Llama-shaped model (as in configs/shakespeare-char-cpu.yaml), with a longer context:
# `ling convert to-hf` exports it as a LlamaForCausalLM.
MODEL = ModelConfig(name="custom", context_length=128, n_layer=4, n_embd=192, n_head=6, position="rope",
                    norm="rmsnorm", mlp="swiglu", mlp_hidden=512)
TRAIN = TrainConfig(batch_tokens=16 * 128, micro_batch=16, lr=3e-3, min_lr=3e-4, warmup_steps=100, beta2=0.95,
                    eval_batches=8, log_every=10, keep_last=1)


@dataclass
class QuickstartArgs:
    """Prepare the builtin corpus, pretrain a small model for about two minutes, sample from it."""

    minutes: float = 2.0
    """training time; preparing the data, setup and sampling come on top"""
    out: str = "runs/quickstart"
    """where the dataset (OUT/data) and the training run (OUT/run) go"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda or mps"""
    prompt: str = "The "
    """the text the samples before and after training continue"""
    sample_tokens: int = 200
    kernels: str = "auto"
    """fast paths: auto = time the candidates on this machine and keep the fastest (the summary
    says which); reference = the plain model (ling/model.py) as it is"""

    def __post_init__(self):
        check_mode(self.kernels)


def quickstart(args: QuickstartArgs) -> int:
    if args.minutes <= 0:
        raise LingError(f"--minutes must be positive, got {args.minutes}")
    started = time.perf_counter()
    out = Path(args.out)
    data_dir, run_dir = out / "data", new_run_dir(out)
    print(f"ling quickstart: the builtin corpus → a small model in about {args.minutes:g} minute(s) of training\n")
    if run_dir != out / "run":
        print(f"   earlier runs in {out} are kept: this one goes to {run_dir}\n")

    print("1. data")
    if (data_dir / "meta.json").exists():
        print(f"   using the dataset prepared earlier in {data_dir}")
    else:
        prepare(PrepareArgs(output=str(data_dir), tokenizer="char", builtin=True))
    data = open_dataset(data_dir)

    device = pick_device(args.device)
    precision = pick_precision("auto", device)
    model_cfg = dataclasses.replace(MODEL, vocab_size=data.tokenizer.vocab_size)
    pretrain_args = PretrainArgs(data=str(data_dir), out=str(run_dir), model=model_cfg,
                                 train=dataclasses.replace(TRAIN, precision=precision), device=str(device),
                                 kernels=args.kernels)
    step_s, eval_s = seconds_per_step(pretrain_args, data.train, device, precision,
                                      budget_s=min(5.0, args.minutes * 2.4))
    steps = plan_steps(args.minutes * 60, step_s, eval_s)
    pretrain_args.train = dataclasses.replace(
        pretrain_args.train, max_steps=steps, time_limit=args.minutes * TIME_MARGIN,
        warmup_steps=min(TRAIN.warmup_steps, steps // 10), eval_every=max(10, steps // EVALS),
    )
    n_params = build_model(model_cfg, device="meta", init=False).num_params()
    print(f"\n2. model: {n_params / 1e6:.1f}M parameters ({model_cfg.n_layer} layers × {model_cfg.n_embd}), "
          f"{precision} on {device}; {step_s * 1000:.0f} ms per step and {eval_s:.1f} s per evaluation → "
          f"{steps} steps in {args.minutes:g} minute(s)")

    prompt = data.tokenizer.encode(args.prompt, add_special_tokens=False)
    torch.manual_seed(pretrain_args.train.seed)  # the initial weights the run starts from
    untrained = build_model(model_cfg, device=device)
    print(f"\n   before training:\n{_indent(_sample(untrained, data.tokenizer, prompt, args.sample_tokens))}\n")
    del untrained

    print("3. training")
    result = run_pretraining(pretrain_args, show_summary=False)
    if result.interrupted:
        return 130
    if result.time_limited:
        print(f"\n   stopped at step {result.step} of {steps}: the {args.minutes:g}-minute budget "
              f"(+{TIME_MARGIN - 1:.0%}) ran out; this machine ran slower than its first steps")

    model, tokenizer = load_checkpoint(run_dir / "best", device=device)
    print(f"\n   after training:\n{_indent(_sample(model, tokenizer, prompt, args.sample_tokens))}\n")
    minutes = (time.perf_counter() - started) / 60
    util = f", MFU {result.mfu:.0%}" if result.mfu is not None else ""
    print(
        f"done in {minutes:.1f} min: {result.tokens_seen:,} tokens seen at {result.tokens_per_s:,.0f} tokens/s{util}; "
        f"val loss {result.final_val_loss:.3f} (best {result.best_val_loss:.3f})\n"
        f"   checkpoint: {run_dir / 'best'}   (the newest: {run_dir / 'latest'})\n"
        f"   curves:     {run_dir / 'report.png'}\n"
        f"   {result.kernels.summary()}\n\n"
        "next, try:\n"
        f"   ling generate {run_dir / 'best'} --prompt \"{args.prompt}\" --max-new-tokens 300\n"
        f"   ling pretrain --config {run_dir / 'config.yaml'} --train.max-steps {2 * steps} "
        "--train.time-limit 0 --resume auto"
        "   # train on\n"
        "   ling prepare --input YOUR_TEXT.txt --tokenizer char --output data/mine   # your own corpus\n"
        "   ling pretrain --data data/mine --out runs/mine --config configs/shakespeare-char-cpu.yaml"
    )
    return 0


EVALS = 6
"""evaluations (each with a checkpoint and report.png) over a quickstart run"""
TIME_MARGIN = 1.1
"""`train.time_limit` is the budget and this much more: a run sized to the budget ends on its
schedule, one on a machine that slowed down is stopped (and says so)"""


def new_run_dir(out: Path) -> Path:
    """OUT/run, or OUT/run-2, run-3 … when earlier quickstarts are there: a run is never deleted."""
    run_dir, n = out / "run", 1
    while run_dir.exists() or run_dir.is_symlink():
        n += 1
        run_dir = out / f"run-{n}"
    return run_dir


def plan_steps(budget_s: float, step_s: float, eval_s: float) -> int:
    """The steps that fit the budget together with the run's evaluations, so that the run ends
    on its schedule (and the progress bar's first ETA is the budget)."""
    return max(20, int((budget_s - EVALS * eval_s) / step_s))


def seconds_per_step(args: PretrainArgs, tokens, device: torch.device, precision: str,
                     budget_s: float) -> tuple[float, float]:
    """Median time of a training step of a throwaway copy of the model, over at least 3 steps
    and `budget_s` seconds (after 2 warm-up steps), and the time of one evaluation with its
    checkpoint and report."""
    cfg = args.train
    model = build_model(args.model, device=device)
    sampler = PretrainSampler(tokens, args.model.context_length, cfg.micro_batch,
                              cfg.accumulation(args.model.context_length, 1))
    val = validation_batches(tokens, args.model.context_length, cfg.micro_batch, cfg.eval_batches)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, cfg, sampler, val, tmp, device=device, precision=precision,
                          flops_per_token=args.model.flops_per_token(), kernels=args.kernels)
        for _ in range(2):
            trainer.train_step().loss.item()
        times, started = [], time.perf_counter()
        while len(times) < 3 or time.perf_counter() - started < budget_s:
            t0 = time.perf_counter()
            trainer.train_step().loss.item()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.evaluate()
        trainer.save_checkpoint()
        trainer.metrics.plot()
        eval_s = time.perf_counter() - t0
        trainer.run.close()
        return statistics.median(times), eval_s


def _sample(model, tokenizer, prompt: list[int], n: int) -> str:
    ids = list(generate_tokens(model, prompt, n, temperature=0.8, top_k=50, seed=0))
    return tokenizer.decode(prompt + ids, skip_special_tokens=True)


def _indent(text: str) -> str:
    return "\n".join("   │ " + line for line in text.splitlines())
