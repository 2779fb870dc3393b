"""`load_gguf`: a GGUF file as a ling model and tokenizer, dequantised on the fly.

gguf-py's `GGUFReader` memory-maps the file; `GGUFTensors` presents its tensors to
`ling.weights.load_tensors` like safetensors files are (PyTorch shapes, q/k rows back in
HF order), dequantising one tensor at a time — every type gguf-py reads (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K … Q6_K, the IQ types). The config comes from the
metadata through the family module (`ling.gguf.arch`), the tokenizer is rebuilt from the
`tokenizer.*` keys (`ling.gguf.vocab`).

The weights load in the file's float type when all matrices share one (F32, F16, BF16),
and in float32 otherwise — dequantised values are exact in float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ling.errors import LingError
from ling.gguf.arch import (
    ROPE_FREQS,
    config_from_metadata,
    family_for_gguf,
    gguf_weight_map,
    permuted_heads,
    unpermute_rows,
)
from ling.gguf.library import require_gguf
from ling.gguf.vocab import TokenizerMetadata, tokenizer_from_metadata
from ling.model import Transformer, build_model
from ling.tokenizer import Tokenizer
from ling.weights import load_tensors, resolve_dtype

MAGIC = b"GGUF"


def is_gguf_file(path: Path) -> bool:
    """A file named *.gguf, or any file that starts with GGUF's magic bytes."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


class GGUFFile:
    """A GGUF file's metadata (as Python values) and tensors, checked to lie inside the file."""

    def __init__(self, path: str | Path):
        gguf = require_gguf()
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(4)
        if head != MAGIC:
            raise LingError(f"{self.path}: not a GGUF file (it starts with {head!r}, GGUF files with b'GGUF')")
        try:  # gguf-py maps the whole file: a truncated one fails here, shaping a tensor past its end
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
            raise LingError(f"{self.path}: not a readable GGUF file, truncated or corrupt "
                            f"({os.path.getsize(self.path)} bytes; {e})") from None
        self.metadata = {name: _value(field) for name, field in self.reader.fields.items()
                         if not name.startswith("GGUF.")}
        self.tensors = {t.name: t for t in self.reader.tensors}

    def shape(self, name: str) -> tuple[int, ...]:
        """PyTorch order (GGUF lists dimensions innermost first)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def read(self, name: str) -> torch.Tensor:
        """One tensor as floats: F32/F16/BF16 as stored, anything quantised as float32."""
        gguf = require_gguf()
        t = self.tensors[name]
        types = gguf.GGMLQuantizationType
        if t.tensor_type in (types.F32, types.F16):
            return torch.from_numpy(np.array(t.data)).reshape(self.shape(name))
        if t.tensor_type == types.BF16:
            return torch.from_numpy(np.array(t.data)).view(torch.bfloat16).reshape(self.shape(name))
        try:
            values = gguf.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise LingError(f"{self.path}: tensor '{name}' is {t.tensor_type.name}, which gguf-py cannot "
                            "dequantise (update the gguf package)") from None
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(self.shape(name))


def _value(field):
    """A metadata field as a Python value; float32 scalars as the decimal they were written from."""
    gguf = require_gguf()
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        return float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
    return value


class GGUFTensors:
    """A GGUF file's tensors as a `ling.weights.TensorStore`, q/k rows restored to HF order."""

    def __init__(self, file: GGUFFile, permuted: dict[str, int]):
        self.file, self.permuted = file, permuted

    def names(self) -> list[str]:
        return list(self.file.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.file.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(self.file.type_name(name), torch.float32)

    def where(self, name: str) -> Path:
        return self.file.path

    def read_into(self, name: str, out: torch.Tensor, transposed: bool = False) -> None:
        value = self.file.read(name)
        if name in self.permuted:
            value = unpermute_rows(value, self.permuted[name])
        out.copy_(value.t() if transposed else value)


def file_dtype(file: GGUFFile) -> torch.dtype:
    """F32, F16 or BF16 when every matrix is stored so; float32 for quantised (or mixed) files."""
    kinds = {file.type_name(n) for n in file.tensors if len(file.shape(n)) >= 2}
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kinds.pop(), torch.float32) if len(kinds) == 1 \
        else torch.float32


def read_tokenizer(file: GGUFFile) -> Tokenizer | None:
    """The tokenizer the file describes, or None when it has none."""
    if "tokenizer.ggml.model" not in file.metadata:
        return None
    return tokenizer_from_metadata(TokenizerMetadata.from_metadata(file.metadata), str(file.path))


def load_gguf(path: str | Path, device="cpu", dtype: str | torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """A GGUF file as a ling model (+ tokenizer). `dtype` None: the file's float type (see above)."""
    file = GGUFFile(path)
    where = str(file.path)
    if "general.architecture" not in file.metadata:
        raise LingError(f"{where}: no general.architecture key — not a model GGUF")
    family = family_for_gguf(file.metadata["general.architecture"], where)
    shapes = {name: file.shape(name) for name in file.tensors}
    rope_freqs = file.read(ROPE_FREQS).double().numpy() if ROPE_FREQS in file.tensors else None
    cfg = config_from_metadata(family, file.metadata, shapes, rope_freqs, where)
    tokenizer = read_tokenizer(file)
    model = build_model(cfg, device="meta", init=False)
    store = GGUFTensors(file, permuted_heads(family, cfg))
    load_tensors(model, store, where=where, device=device, dtype=resolve_dtype(dtype) or file_dtype(file),
                 weight_map=gguf_weight_map(family, cfg), ignore=lambda name: name == ROPE_FREQS)
    model.init_buffers()
    return model, tokenizer
