"""`ling convert from-hf` and `ling convert to-hf`: Hugging Face model directories ⇄ ling checkpoints.

Both write into a temporary directory that becomes OUT_DIR only when complete, so an
error (bad input, unsupported option, full disk) leaves nothing behind.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import tyro

from ling.atomic import atomic_dir, check_output_dir
from ling.checkpoint import is_hf_dir, load_checkpoint, save_model_dir, written_by_ling
from ling.errors import LingError, read_json
from ling.hf.checkpoint import DEFAULT_MAX_SHARD_SIZE, load_hf_checkpoint, save_hf_dir

GENERATION_CONFIG = "generation_config.json"
"""Kept beside a converted checkpoint so that exporting it again restores sampling defaults and stop ids."""


@dataclass
class FromHFArgs:
    """Convert a Hugging Face model directory into a ling checkpoint directory."""

    hf_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="HF_DIR")]
    """HF model directory (config.json with `architectures`, safetensors weights, tokenizer files)"""
    out_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT_DIR")]
    """ling checkpoint directory to create"""
    dtype: Optional[Literal["bf16", "fp16", "fp32"]] = None
    """dtype of the written weights (default: as stored)"""
    overwrite: bool = False
    """replace OUT_DIR if it holds a ling checkpoint (swapped once the new one is complete)"""


@dataclass
class ToHFArgs:
    """Write a ling checkpoint (or an HF directory) as a Hugging Face model directory."""

    ckpt_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CKPT_DIR")]
    """checkpoint directory to export"""
    out_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT_DIR")]
    """HF model directory to create (loads with AutoModelForCausalLM / AutoTokenizer)"""
    dtype: Optional[Literal["bf16", "fp16", "fp32"]] = None
    """dtype of the written weights (default: as stored)"""
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
    """weights above this size are split into shards + model.safetensors.index.json"""
    overwrite: bool = False
    """replace OUT_DIR if it holds a Hugging Face export ling wrote (swapped once the new one is complete)"""


def _ling_checkpoint(path: Path) -> bool:
    return written_by_ling(path) and not is_hf_dir(path)


def _ling_hf_export(path: Path) -> bool:
    return written_by_ling(path) and is_hf_dir(path)


def _size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def from_hf(args: FromHFArgs) -> None:
    start = time.perf_counter()
    out = check_output_dir(args.out_dir, args.overwrite, _ling_checkpoint, "a checkpoint")
    source = Path(args.hf_dir)
    if not source.is_dir():
        raise LingError(f"{source}: no such directory")
    model, tokenizer = load_hf_checkpoint(source, dtype=args.dtype)
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        save_model_dir(model, tokenizer, tmp)
        if (source / GENERATION_CONFIG).exists():
            shutil.copyfile(source / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
    dtype = next(model.parameters()).dtype
    print(f"wrote {out}: ling checkpoint ({model.cfg.name}, {model.num_params() / 1e6:.1f}M parameters, "
          f"{str(dtype).removeprefix('torch.')}, {_size_text(_weights_bytes(model))}) "
          f"in {time.perf_counter() - start:.1f}s")
    if tokenizer is None:
        print(f"note: {source} has no tokenizer.json, so the checkpoint has no tokenizer")


def to_hf(args: ToHFArgs) -> None:
    start = time.perf_counter()
    out = check_output_dir(args.out_dir, args.overwrite, _ling_hf_export, "a Hugging Face export")
    model, tokenizer = load_checkpoint(args.ckpt_dir, dtype=args.dtype)
    generation_file = Path(args.ckpt_dir) / GENERATION_CONFIG
    generation = read_json(generation_file) if generation_file.exists() else None
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        family = save_hf_dir(model, tokenizer, tmp, max_shard_size=args.max_shard_size, generation_config=generation)
        shards = len(list(tmp.glob("*.safetensors")))
    dtype = next(model.parameters()).dtype
    print(f"wrote {out}: {family.architecture} ({model.num_params() / 1e6:.1f}M parameters, "
          f"{str(dtype).removeprefix('torch.')}, {_size_text(_weights_bytes(model))}, "
          f"{shards} shard{'s' if shards > 1 else ''}) in {time.perf_counter() - start:.1f}s")
