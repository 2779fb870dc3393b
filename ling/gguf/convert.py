"""`ling convert to-gguf` and `ling convert from-gguf`: checkpoints ⇄ GGUF files.

Both write to a temporary path that becomes the output only when complete, and refuse an
existing output unless `--overwrite`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import tyro

from ling.atomic import atomic_dir, check_output_dir
from ling.checkpoint import is_hf_dir, load_checkpoint, save_model_dir, written_by_ling
from ling.errors import LingError
from ling.gguf.reader import is_gguf_file, load_gguf
from ling.gguf.writer import FILE_TYPES, save_gguf


@dataclass
class ToGGUFArgs:
    """Write a checkpoint as one GGUF file, for llama.cpp (llama-cli, llama-server) and Ollama."""

    ckpt: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CKPT")]
    """ling checkpoint, Hugging Face directory, LoRA run (merged first) or GGUF file"""
    out: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT.gguf")]
    """GGUF file to create"""
    dtype: str = "f16"
    """f32, f16, bf16, q8_0 or q4_0: type of the weight matrices (norms and biases stay f32); q8_0 and q4_0
    are llama.cpp's block quantisations"""
    overwrite: bool = False
    """replace OUT.gguf if it is a GGUF file"""


@dataclass
class FromGGUFArgs:
    """Convert a GGUF file (dequantised) into a ling checkpoint directory."""

    gguf_file: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="IN.gguf")]
    """GGUF file of a llama, qwen2, qwen3 or gpt2 model with a byte-level BPE tokenizer"""
    out_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT_DIR")]
    """ling checkpoint directory to create"""
    dtype: Optional[Literal["bf16", "fp16", "fp32"]] = None
    """dtype of the written weights (default: the file's F32/F16/BF16; fp32 for quantised files)"""
    overwrite: bool = False
    """replace OUT_DIR if it holds a ling checkpoint (swapped once the new one is complete)"""


def _size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def to_gguf(args: ToGGUFArgs) -> None:
    start = time.perf_counter()
    out = Path(args.out)
    if args.dtype not in FILE_TYPES:
        raise LingError(f"--dtype {args.dtype} is not supported (choose one of {', '.join(FILE_TYPES)})")
    if out.is_dir():
        raise LingError(f"{out}: is a directory; give the path of the .gguf file to write")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise LingError(f"{out}: exists and is not a plain file; choose another path")
    if out.exists() and not args.overwrite:
        raise LingError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not is_gguf_file(out):
        raise LingError(f"{out} is not a GGUF file, so --overwrite does not replace it: move it away or choose another path")
    model, tokenizer = load_checkpoint(args.ckpt)
    if tokenizer is None:
        raise LingError(f"{args.ckpt}: no tokenizer.json — a GGUF file needs the tokenizer to run in llama.cpp")
    n_tensors = save_gguf(model, tokenizer, out, dtype=args.dtype)
    print(f"wrote {out}: {model.cfg.name} ({model.num_params() / 1e6:.1f}M parameters), {args.dtype}, "
          f"{n_tensors} tensors, {_size_text(out.stat().st_size)} in {time.perf_counter() - start:.1f}s")


def from_gguf(args: FromGGUFArgs) -> None:
    start = time.perf_counter()
    out = Path(args.out_dir)
    check_output_dir(out, args.overwrite, lambda path: written_by_ling(path) and not is_hf_dir(path), "a checkpoint")
    source = Path(args.gguf_file)
    if not source.is_file():
        raise LingError(f"{source}: no such file")
    model, tokenizer = load_gguf(source, dtype=args.dtype)
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        save_model_dir(model, tokenizer, tmp)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"wrote {out}: ling checkpoint ({model.cfg.name}, {model.num_params() / 1e6:.1f}M parameters, {dtype}"
          f"{', tokenizer with chat template' if tokenizer is not None and tokenizer.chat_template else ''}) "
          f"in {time.perf_counter() - start:.1f}s")
    if tokenizer is None:
        print(f"note: {source} has no tokenizer metadata, so the checkpoint has no tokenizer")
