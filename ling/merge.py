"""`ling merge`: fold a LoRA adapter into its base model and write a plain checkpoint."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ling.adapter_dir import ADAPTER_CONFIG, is_adapter_dir, load_adapter_dir
from ling.atomic import atomic_dir, check_output_dir
from ling.checkpoint import is_hf_dir, load_checkpoint, save_model_dir, written_by_ling
from ling.errors import LingError
from ling.train.heads import HEAD_CONFIG, HEAD_WEIGHTS


@dataclass
class MergeArgs:
    """Fold a LoRA adapter into its base model and write a plain checkpoint directory."""

    adapter: str
    """adapter directory (a LoRA run's output, or one of its checkpoints)"""
    out: str
    """where to write the merged checkpoint"""
    base: Optional[str] = None
    """base checkpoint, Hugging Face directory or GGUF file (default: the one recorded in the adapter)"""
    dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None
    """dtype of the merged weights (default: the base's)"""
    overwrite: bool = False
    """replace `out` if it holds a ling checkpoint (swapped once the merged one is complete)"""


def merge(args: MergeArgs) -> None:
    if not is_adapter_dir(args.adapter):
        raise LingError(f"{args.adapter}: no {ADAPTER_CONFIG} here — give the output directory of a LoRA run")
    check_output_dir(args.out, args.overwrite, lambda path: written_by_ling(path) and not is_hf_dir(path),
                     "a checkpoint")
    model, tokenizer = load_adapter_dir(args.adapter, load_checkpoint, base=args.base, dtype=args.dtype)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        save_model_dir(model, tokenizer, tmp)
        for name in (HEAD_CONFIG, HEAD_WEIGHTS):  # a classifier's head stays beside its body
            if (Path(args.adapter) / name).exists():
                shutil.copyfile(Path(args.adapter) / name, tmp / name)
    print(f"merged {args.adapter} into its base: {model.num_params():,} parameters written to {args.out}")
