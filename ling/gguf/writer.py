"""`save_gguf`: a ling model + tokenizer as one GGUF file llama.cpp and Ollama run.

The metadata (architecture, tokenizer, chat template) and the tensor table are written
first; then each tensor is cut from its ling parameter (q, k, v apart), put in llama.cpp's
row order, converted or quantised by gguf-py and written — one at a time, so memory stays
at the model plus one tensor. The file appears only when complete (`atomic_path`).

Tensor types follow llama.cpp's converter: vectors (norms, biases) and `rope_freqs` stay
F32; matrices take the file's type. Q8_0 and Q4_0 need rows that are whole 32-value
blocks (others fall back to F16), and Q4_0 keeps the LM head in Q8_0: the head is the most
sensitive matrix, and llama-quantize's choice for it (Q6_K) is one gguf-py cannot write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ling.atomic import atomic_path
from ling.errors import LingError
from ling.gguf.arch import (
    ARCHS,
    ROPE_FREQS,
    arch_metadata,
    gguf_weight_map,
    model_name,
    permute_rows,
    permuted_heads,
    rope_factors,
)
from ling.gguf.library import require_gguf
from ling.gguf.vocab import TokenizerMetadata, tokenizer_metadata
from ling.hf.checkpoint import export_family
from ling.hf.family import parameter_shapes
from ling.model import Transformer
from ling.tokenizer import Tokenizer

FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
"""`--dtype` → llama.cpp's file type (`general.file_type`)."""
MATRIX_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: object
    """gguf.GGMLQuantizationType"""
    make: Callable[[], torch.Tensor]
    """the tensor's values (float), in llama.cpp's row order"""


def tensor_type(dtype: str, name: str, shape: tuple[int, ...], head: str):
    """The GGML type a tensor gets in a file of `dtype` (see the module docstring)."""
    gguf = require_gguf()
    types = gguf.GGMLQuantizationType
    if len(shape) < 2 or name == ROPE_FREQS:
        return types.F32
    wanted = types[MATRIX_TYPES[dtype]]
    if wanted == types.Q4_0 and name == head:
        wanted = types.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else types.F16


def plan_tensors(model: Transformer, dtype: str) -> list[PlannedTensor]:
    """Every GGUF tensor of `model`, in ling's parameter order."""
    family = export_family(model.cfg)
    stored = family.as_stored(model.cfg)
    params = dict(model.state_dict())
    shapes = parameter_shapes(stored)
    heads = permuted_heads(family, stored)
    head = "token_embd.weight" if stored.tie_embeddings else "output.weight"
    planned = []
    for param, sources in gguf_weight_map(family, stored).items():
        row = 0
        for source in sources:
            def make(param=param, start=row, rows=source.rows, name=source.name):
                # parameters a model lacks but the family stores (GPT-2's biases) are zeros
                value = params[param] if param in params else torch.zeros(shapes[param])
                piece = value[start:start + rows].detach().float()
                return permute_rows(piece, heads[name]) if name in heads else piece
            shape = (source.rows, *shapes[param][1:])
            planned.append(PlannedTensor(source.name, shape, tensor_type(dtype, source.name, shape, head), make))
            row += source.rows
    if stored.rope_scaling is not None:
        factors = rope_factors(stored)
        planned.append(PlannedTensor(ROPE_FREQS, tuple(factors.shape), tensor_type(dtype, ROPE_FREQS, (1,), head),
                                     lambda: factors))
    return planned


def encode(values: torch.Tensor, qtype) -> np.ndarray:
    """Tensor values as the bytes (or floats) of GGML type `qtype`."""
    gguf = require_gguf()
    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return values.float().contiguous().numpy()
    if qtype == types.F16:
        return values.half().contiguous().numpy()
    if qtype == types.BF16:
        return values.bfloat16().contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quantize(values.float().contiguous().numpy(), qtype)


def add_metadata(writer, model: Transformer, tokenizer: TokenizerMetadata | None, dtype: str) -> None:
    gguf = require_gguf()
    family = export_family(model.cfg)
    if model_name(model.cfg) is not None:
        writer.add_name(model_name(model.cfg))
    writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[dtype]]))
    if dtype in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in arch_metadata(family, family.as_stored(model.cfg)).items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    if tokenizer is None:
        return
    writer.add_tokenizer_model(tokenizer.model)
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    writer.add_token_merges(tokenizer.merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                          (writer.add_pad_token_id, tokenizer.pad_id), (writer.add_unk_token_id, tokenizer.unk_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def save_gguf(model: Transformer, tokenizer: Tokenizer | None, path: str | Path, dtype: str = "f16") -> int:
    """Write `model` (and its tokenizer) as a GGUF file; returns the number of tensors.

    LingError, before anything is written, for a model of no supported family, a tokenizer
    llama.cpp would split differently, or an unknown dtype.
    """
    gguf = require_gguf()
    if dtype not in FILE_TYPES:
        raise LingError(f"--dtype {dtype} is not supported (choose one of {', '.join(FILE_TYPES)})")
    family = export_family(model.cfg)
    vocab = tokenizer_metadata(tokenizer, model.cfg.vocab_size) if tokenizer is not None else None
    planned = plan_tensors(model, dtype)
    writer = gguf.GGUFWriter(path=None, arch=ARCHS[family.architecture].name)
    add_metadata(writer, model, vocab, dtype)
    for t in planned:
        block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
        nbytes = int(np.prod(t.shape)) // block * type_size
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
    with atomic_path(path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with torch.no_grad():
                for t in tqdm(planned, desc="writing GGUF", unit="tensor", disable=None, delay=2, leave=False):
                    writer.write_tensor_data(encode(t.make(), t.qtype))
        finally:
            writer.close()
    return len(planned)
