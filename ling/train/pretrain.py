"""`ling pretrain`: train a language model from scratch on a dataset made by `ling prepare`."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ling.atomic import atomic_file
from ling.config import ModelConfig
from ling.data.dataset import open_dataset
from ling.data.sampler import PretrainSampler, validation_batches
from ling.dataclass_io import to_dict
from ling.device import pick_device, pick_precision
from ling.errors import LingError
from ling.kernels import check_mode
from ling.model import build_model
from ling.train import distributed
from ling.train.checkpointing import load_model_weights
from ling.train.config import TrainConfig
from ling.train.trainer import Trainer, TrainResult


@dataclass
class PretrainArgs:
    """Pretrain a model on a prepared dataset directory."""

    data: str
    """dataset directory written by `ling prepare` (train.bin, val.bin, meta.json, tokenizer.json)"""
    out: str
    """run directory: checkpoints/, latest, best, metrics.jsonl, config.yaml, report.png"""
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_name("shakespeare-char"))
    """model shape: --model.name PRESET starts from a preset, other --model.* flags override it;
    vocab_size always comes from the dataset's tokenizer; context_length is the training sequence length"""
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: Optional[str] = None
    """'auto' = continue from the newest complete checkpoint in --out (or start fresh if there is
    none); or the path of a checkpoint directory"""
    init_from: Optional[str] = None
    """start from the weights of this checkpoint directory (same --model settings), with a fresh
    optimizer at step 0 — e.g. a checkpoint whose train_state.pt is lost; ignored when --resume
    continues a checkpoint"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"""
    kernels: str = "auto"
    """fast paths: auto = time the candidates on this machine and keep the fastest (the summary
    says which); reference = the plain model (ling/model.py) as it is"""

    def __post_init__(self):
        check_mode(self.kernels)


def pretrain(args: PretrainArgs) -> int:
    result = run_pretraining(args)
    return 130 if result.interrupted else 0


def run_pretraining(args: PretrainArgs, show_summary: bool = True, after_eval=None) -> TrainResult:
    """The whole command; returns the result for callers such as `ling quickstart`. `after_eval`
    goes to the trainer (`Trainer.after_eval`: e.g. `ling sweep`'s pruning)."""
    device = pick_device(args.device)
    dist = distributed.init_distributed(device.type, args.train.parallel)
    try:
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        data = open_dataset(args.data)
        precision = pick_precision(args.train.precision, device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores
        model_cfg = dataclasses.replace(args.model, vocab_size=data.tokenizer.vocab_size)
        if dist.is_main:
            warn_if_not_exportable(model_cfg)
        resolved = dataclasses.replace(args, model=model_cfg, device=str(device),
                                       train=dataclasses.replace(args.train, precision=precision))
        seq_len = model_cfg.context_length
        accumulation = args.train.accumulation(seq_len, dist.world_size)

        torch.manual_seed(args.train.seed)  # the same initial weights in every process
        model = build_model(model_cfg, device=device)
        if args.init_from is not None:
            load_model_weights(model, Path(args.init_from))
        sampler = PretrainSampler(data.train, seq_len, args.train.micro_batch, accumulation,
                                  dist.rank, dist.world_size, seed=args.train.seed)
        val = validation_batches(data.val, seq_len, args.train.micro_batch, args.train.eval_batches,
                                 dist.rank, dist.world_size)
        trainer = Trainer(
            model, resolved.train, sampler, val, args.out, device=device, precision=precision,
            tokenizer=data.tokenizer, dist=dist,
            flops_per_token=model_cfg.flops_per_token(seq_len), config=to_dict(resolved),
            resume_hint=f"ling pretrain --config {Path(args.out) / 'config.yaml'} --resume auto", kernels=args.kernels,
            init_hint=lambda path: f"ling pretrain --config {Path(args.out) / 'config.yaml'} --init-from {path} "
                                   "--out NEW_DIR",
            sample_prompt=[int(t) for t in data.val[: min(16, seq_len // 2)]], after_eval=after_eval,
        )
        if dist.is_main:
            print(f"model: {model_cfg.name}, {model.num_params() / 1e6:.2f}M parameters · {precision} on {device}"
                  f" · batch {args.train.batch_tokens:,} tokens = {dist.world_size} process(es) × {accumulation}"
                  f" × {args.train.micro_batch} × {seq_len}" + (" · compiled" if args.train.compile else "")
                  + (" · FSDP (sharded)" if dist.sharded else " · DDP" if dist.enabled else ""),
                  file=sys.stderr)
        result = trainer.fit(args.resume)
        if dist.is_main:
            with atomic_file(Path(args.out) / "summary.json") as f:
                f.write(json.dumps({"model": model_cfg.name, "params": model.num_params(), **result.to_dict()},
                                   indent=2) + "\n")
        if show_summary and dist.is_main and not result.interrupted:
            print_summary(result, Path(args.out))
        return result
    finally:
        distributed.shutdown(dist)


def warn_if_not_exportable(cfg: ModelConfig) -> None:
    """Say before training, not after, that a shape no Hugging Face family has cannot leave ling
    through `ling convert to-hf` (nor get PEFT files from a LoRA run)."""
    from ling.hf.checkpoint import export_family

    try:
        export_family(cfg)
    except LingError as e:
        print(f"note: `ling convert to-hf` and LoRA's PEFT files will not work on this model: {e} "
              "(RMSNorm, SwiGLU and RoPE make it Llama-shaped)", file=sys.stderr)


def print_summary(result: TrainResult, run_dir: Path) -> None:
    val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "-"
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "-"
    util = f" · MFU {result.mfu:.1%}" if result.mfu is not None else ""
    print(
        f"\ndone: {result.step} steps, {result.tokens_seen:,} tokens in {result.seconds:.0f} s "
        f"({result.tokens_per_s:,.0f} tokens/s{util})\n"
        f"val loss {val} (best {best})\n"
        f"checkpoints: {run_dir / 'latest'}, {run_dir / 'best'}\n"
        f"report:      {run_dir / 'report.png'}  ·  metrics: {run_dir / 'metrics.jsonl'}\n"
        f"{result.kernels.summary() if result.kernels else 'kernels: -'}"
    )
