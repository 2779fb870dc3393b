"""Model checkpoint directories: `config.json` + `model.safetensors` + tokenizer files.

This is what every command that takes a model accepts (training run checkpoints add a
`train_state.pt` beside these, see `ling.train`). Parameter names are the plain names of
`ling.model.Transformer` — never `_orig_mod.` or `module.` prefixes — and a tied LM head
is stored once (as `embed.weight`).

Loading builds the model on the meta device and assigns tensors read from safetensors
one by one, so a checkpoint is never held twice in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ling.config import ModelConfig
from ling.errors import LingError
from ling.model import Transformer, build_model
from ling.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside torch.compile / DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def save_model_dir(model: Transformer, tokenizer: Tokenizer | None, directory: str | Path) -> None:
    """Write config.json, model.safetensors and the tokenizer files into `directory`.

    Callers that need atomicity write into `ling.atomic.atomic_dir`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bare = unwrap(model)
    bare.cfg.save(directory / "config.json")
    tensors = {k: v.detach().contiguous().cpu() for k, v in clean_state_dict(bare).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt", "producer": "ling"})
    if tokenizer is not None:
        tokenizer.save(directory)


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: config.json with `architectures`."""
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    try:
        return "architectures" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def load_checkpoint(path: str | Path, device="cpu", dtype: str | torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Load a ling checkpoint directory, a Hugging Face model directory (converted on the fly), or a
    LoRA adapter directory (its base with the adapter merged in)."""
    path = Path(path)
    if not path.exists():
        raise LingError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise LingError(f"{path}: a checkpoint is a directory (config.json, model.safetensors, tokenizer.json)")
    if is_hf_dir(path):
        from ling.hf import load_hf_checkpoint

        return load_hf_checkpoint(path, device=device, dtype=dtype)
    from ling.train.lora import is_adapter_dir, load_with_adapter

    if is_adapter_dir(path):  # a LoRA run's output: its base, with the adapter merged in
        return load_with_adapter(path, device=device, dtype=dtype)
    if not (path / "config.json").exists():
        raise LingError(f"{path}: missing config.json — is this a checkpoint directory?")
    cfg = ModelConfig.load(path / "config.json")
    weights = path / "model.safetensors"
    if not weights.exists():
        raise LingError(f"{path}: missing model.safetensors")
    model = build_model(cfg, device="meta", init=False)
    load_tensors(model, read_safetensors(weights), where=str(weights), device=device, dtype=resolve_dtype(dtype))
    model.init_buffers()
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    return model, tokenizer


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LingError(f"unknown dtype '{dtype}' (choose one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def read_safetensors(*files: str | Path):
    """Yield (name, tensor) from safetensors files lazily (memory-mapped), one tensor at a time."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except LingError:
            raise
        except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt files
            raise LingError(f"{file}: cannot read safetensors file ({e})") from None


def load_tensors(model: torch.nn.Module, tensors, where: str, device="cpu", dtype: torch.dtype | None = None) -> None:
    """Assign named tensors to a (meta-device) model, checking names and shapes.

    Each tensor is moved to `device`/`dtype` as it arrives; a missing, unexpected or
    mis-shaped tensor is a `LingError` naming it.
    """
    expected = dict(model.state_dict(keep_vars=True))
    tied = getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    seen = set()
    for name, tensor in tensors:
        if name not in expected:
            raise LingError(f"{where}: unexpected tensor '{name}' (not a parameter of this model)")
        target = expected[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise LingError(
                f"{where}: tensor '{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
            )
        value = tensor.to(device=device, dtype=dtype or (tensor.dtype if tensor.is_floating_point() else None))
        _assign(model, name, value)
        seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LingError(f"{where}: missing tensor(s) {', '.join(repr(m) for m in missing[:3])}{more}")
    if tied:
        model.lm_head.weight = model.embed.weight


def _assign(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = getattr(module, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, value)

