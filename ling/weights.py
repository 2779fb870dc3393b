"""Model parameters ⇄ stored tensors: the machinery every checkpoint format shares.

- `SafetensorsFiles` reads tensors from memory-mapped safetensors files one at a time;
- a `WeightMap` says which stored tensors make each model parameter (renamed, stacked
  along dim 0, transposed), so one loader serves ling's own names and every family's;
- `load_tensors` fills a meta-device model from any `TensorStore` (safetensors files, a
  GGUF file) through a weight map, checking names and shapes first;
- `clean_state_dict` / `unwrap` give the plain parameter names a checkpoint stores.

It depends on the model alone: format readers (`ling.ling_dir`, `ling.hf`, `ling.gguf`)
build on it, and `ling.checkpoint` picks among them.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from ling.errors import LingError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRODUCER = "ling"
"""the `producer` in the metadata of every safetensors file ling writes (how --overwrite knows its own)"""


def clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters under their plain names: compile/DDP/FSDP wrappers unwrapped, tied head dropped."""
    sd = {}
    for name, tensor in model.state_dict().items():
        for prefix in ("_orig_mod.", "module."):
            name = name.replace(prefix, "")
        sd[name] = tensor
    cfg = getattr(unwrap(model), "cfg", None)
    if cfg is not None and cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def written_by_ling(directory: str | Path) -> bool:
    """Whether a model directory (a ling checkpoint or a Hugging Face export) is one ling
    wrote: its first safetensors file says `producer: ling` in its metadata."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return False
    try:
        with open(files[0], "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:
                return False
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError):
        return False
    return isinstance(header, dict) and (header.get("__metadata__") or {}).get("producer") == PRODUCER


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside torch.compile / DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LingError(f"unknown dtype '{dtype}' (choose one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------
# Reading safetensors files: memory-mapped, one tensor at a time
# ---------------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
COPY_CHUNK_BYTES = 16 << 20
"""Tensors are copied out of the file in slices of about this size, each released right after."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: its file, dtype, shape and byte range."""

    file: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFiles:
    """The tensors of one or more safetensors files (a sharded checkpoint), by name.

    Files are memory-mapped, so nothing is read until a tensor is copied out with
    `read_into`; the pages it touched are then handed back to the OS. Peak memory while
    loading is therefore the destination tensors plus one slice, not the file size on top
    of them (which is what keeping a whole file mapped and resident would cost).
    """

    def __init__(self, *files: str | Path):
        self.files = [Path(f) for f in files]
        self.tensors: dict[str, StoredTensor] = {}
        self.maps: list[mmap.mmap] = []
        try:
            for index, file in enumerate(self.files):
                self._open(index, file)
        except BaseException:
            self.close()
            raise

    def _open(self, index: int, file: Path) -> None:
        def bad(reason: str) -> LingError:
            return LingError(f"{file}: not a valid safetensors file ({reason})")

        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise bad(f"{size} bytes, shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > min(size - 8, 100 << 20):
                    raise bad(f"header length {header_len} does not fit in a {size}-byte file")
                header = json.loads(f.read(header_len))
                self.maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except FileNotFoundError:
            raise LingError(f"{file}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        data_start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(n) for n in info["shape"])
                begin, end = (int(n) for n in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise bad(f"entry for tensor '{name}' is malformed: {info!r}") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if begin < 0 or end - begin != nbytes or data_start + end > size:
                raise bad(f"tensor '{name}' claims bytes {begin}..{end}, inconsistent with its shape or the file size")
            if name in self.tensors:
                raise LingError(f"{file}: tensor '{name}' is also in {self.files[self.tensors[name].file]}")
            self.tensors[name] = StoredTensor(index, dtype, shape, data_start + begin, data_start + end)

    def __enter__(self) -> "SafetensorsFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # a tensor view is still alive (an error mid-copy); it unmaps when freed
                pass
        self.maps = []

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def where(self, name: str) -> Path:
        return self.files[self.tensors[name].file]

    def read(self, name: str) -> torch.Tensor:
        """A copy of one tensor, in its stored dtype."""
        t = self.tensors[name]
        out = torch.empty(t.shape, dtype=t.dtype)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor, transposed: bool = False) -> None:
        """Copy tensor `name` (transposed if asked) into `out`, converting dtype/device as `out` has them."""
        t = self.tensors[name]
        m = self.maps[t.file]
        if t.end == t.begin:
            return
        with warnings.catch_warnings():  # the mapping is read-only and is only ever read from
            warnings.simplefilter("ignore", UserWarning)
            stored = torch.frombuffer(m, dtype=t.dtype, count=math.prod(t.shape), offset=t.begin).view(t.shape)
        if transposed or stored.dim() == 0:
            out.copy_(stored.t() if transposed else stored)
            self._release(m, t.begin, t.end)
            return
        row_bytes = max(1, (t.end - t.begin) // max(1, t.shape[0]))
        step = max(1, COPY_CHUNK_BYTES // row_bytes)
        for start in range(0, t.shape[0], step):
            stop = min(start + step, t.shape[0])
            out[start:stop].copy_(stored[start:stop])
            self._release(m, t.begin + start * row_bytes, t.begin + stop * row_bytes)

    @staticmethod
    def _release(m: mmap.mmap, begin: int, end: int) -> None:
        """Drop the mapped pages of [begin, end) from this process (they stay in the page cache)."""
        if not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = begin - begin % mmap.PAGESIZE
        m.madvise(mmap.MADV_DONTNEED, start, end - start)


def read_safetensors(*files: str | Path):
    """Yield (name, tensor) from safetensors files, one tensor copy at a time."""
    with SafetensorsFiles(*files) as stored:
        for name in stored.names():
            yield name, stored.read(name)


# ---------------------------------------------------------------------------------------
# Assigning stored tensors to a model
# ---------------------------------------------------------------------------------------
class TensorStore(Protocol):
    """Named tensors in a file, read one at a time (`SafetensorsFiles`, `ling.gguf.GGUFTensors`)."""

    def names(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def where(self, name: str) -> Path: ...
    def read_into(self, name: str, out: torch.Tensor, transposed: bool = False) -> None: ...


@dataclass(frozen=True)
class Source:
    """One stored tensor that fills `rows` rows (dim 0) of a model parameter.

    A parameter is its sources stacked along dim 0, in order: one source for a plain
    rename, three for a fused [q|k|v] projection stored as separate q/k/v tensors.
    `transposed`: stored as (in, out), as GPT-2's Conv1D layers are.
    """

    name: str
    rows: int
    transposed: bool = False


WeightMap = dict[str, tuple[Source, ...]]
"""Model parameter name → the stored tensors it is made of."""


def model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters a checkpoint holds (a tied LM head is stored once, as the embedding)."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def identity_map(shapes: dict[str, tuple[int, ...]]) -> WeightMap:
    """Each parameter stored whole under its own name (ling's own checkpoints)."""
    return {name: (Source(name, shape[0] if shape else 1),) for name, shape in shapes.items()}


def load_tensors(model: torch.nn.Module, files: TensorStore, where: str, device="cpu",
                 dtype: torch.dtype | None = None, weight_map: WeightMap | None = None,
                 ignore: Callable[[str], bool] = lambda name: False) -> None:
    """Fill a (meta-device) model from stored tensors, checking names and shapes first.

    Every parameter is allocated once on `device` in `dtype` (None: the stored dtype;
    non-float tensors keep theirs) and its sources are copied straight into it, so the
    checkpoint is never held twice. A missing, unexpected (and not `ignore`d) or mis-shaped
    stored tensor is a `LingError` naming it, raised before anything is loaded.
    """
    shapes = model_shapes(model)
    weight_map = weight_map if weight_map is not None else identity_map(shapes)
    _check(files, shapes, weight_map, where, ignore)
    for name, sources in tqdm(weight_map.items(), desc="loading", unit="tensor", disable=None, delay=2, leave=False):
        stored_dtype = files.dtype(sources[0].name)
        target_dtype = dtype if dtype is not None and stored_dtype.is_floating_point else stored_dtype
        value = torch.empty(shapes[name], dtype=target_dtype, device=device)
        row = 0
        for source in sources:
            files.read_into(source.name, value[row : row + source.rows], transposed=source.transposed)
            row += source.rows
        _assign(model, name, value)
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight


def _expected_shape(shape: tuple[int, ...], source: Source) -> tuple[int, ...]:
    piece = (source.rows, *shape[1:])
    return tuple(reversed(piece)) if source.transposed else piece


def _check(files: TensorStore, shapes, weight_map: WeightMap, where: str, ignore) -> None:
    used = set()
    missing = []
    for name, sources in weight_map.items():
        for source in sources:
            used.add(source.name)
            if source.name not in files:
                missing.append(source.name)
                continue
            expected = _expected_shape(shapes[name], source)
            if files.shape(source.name) != expected:
                raise LingError(
                    f"{files.where(source.name)}: tensor '{source.name}' has shape {files.shape(source.name)}, "
                    f"the model expects {expected}"
                )
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LingError(f"{where}: missing tensor(s) {', '.join(repr(m) for m in missing[:3])}{more}")
    unexpected = [n for n in files.names() if n not in used and not ignore(n)]
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise LingError(
            f"{files.where(unexpected[0])}: unexpected tensor(s) {', '.join(repr(n) for n in unexpected[:3])}{more} "
            "(not parameters of this model)"
        )


def _assign(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = getattr(module, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, value)

