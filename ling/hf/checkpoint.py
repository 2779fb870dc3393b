"""Hugging Face model directories: load one as a ling model (converted on the fly), write one.

Reading never imports transformers: config.json is mapped by the family module named in
its `architectures`, and the weights stream from the (possibly sharded) safetensors files
through `ling.weights.load_tensors` with the family's weight map.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ling.atomic import set_default_mode
from ling.config import ModelConfig
from ling.errors import LingError, read_json
from ling.hf import gpt2, llama, mistral, qwen2, qwen3
from ling.hf.family import Family, parameter_shapes
from ling.model import Transformer, build_model
from ling.tokenizer import Tokenizer
from ling.weights import PRODUCER, SafetensorsFiles, load_tensors, resolve_dtype

FAMILIES: list[Family] = [llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mistral.FAMILY, gpt2.FAMILY]
"""In order of preference when a ling model fits more than one (Llama-shaped → Llama)."""

SUPPORTED = ", ".join(sorted(f.architecture for f in FAMILIES))
DEFAULT_MAX_SHARD_SIZE = "5GB"
INDEX_FILE = "model.safetensors.index.json"


# ---- reading ------------------------------------------------------------------------------
def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory: config.json with `architectures`."""
    config = path / "config.json"
    if not path.is_dir() or not config.exists():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # not HF's; reading it as ling's config says what is wrong
    return isinstance(data, dict) and "architectures" in data


def read_hf_config(path: Path) -> tuple[Family, ModelConfig]:
    """The family and ling ModelConfig of an HF model directory; LingError if unsupported."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise LingError(f"{path}: missing config.json — is this a Hugging Face model directory?")
    data = read_json(config_file)
    architectures = data.get("architectures") or []
    family = next((f for f in FAMILIES if f.architecture in architectures), None)
    if family is None:
        raise LingError(f"{config_file}: architecture {', '.join(architectures) or '(none)'} is not supported "
                        f"(ling supports {SUPPORTED})")
    if data.get("quantization_config"):
        method = data["quantization_config"].get("quant_method", "?")
        raise LingError(f"{config_file}: quantized checkpoints ({method}) are not supported "
                        "(ling loads float32/bfloat16/float16 weights)")
    return family, family.config_from_hf(data, str(config_file))


def weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise LingError(f"{index}: not a valid safetensors index ({e})") from None
        for shard in shards:
            if not (path / shard).exists():
                raise LingError(f"{index}: lists shard '{shard}', which is missing from {path}")
        return [path / shard for shard in shards]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    if any(path.glob("pytorch_model*.bin")):
        raise LingError(f"{path}: only pytorch_model.bin weights found; ling reads safetensors "
                        "(re-save with transformers' save_pretrained(..., safe_serialization=True))")
    raise LingError(f"{path}: missing weights (model.safetensors or {INDEX_FILE})")


def load_hf_checkpoint(path: str | Path, device="cpu",
                       dtype: str | torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """An HF model directory as a ling model (+ its tokenizer), streamed from safetensors.

    The model is built on the meta device; each parameter is then allocated once, in
    `dtype` (None: as stored), and filled straight from the memory-mapped files.
    """
    path = Path(path)
    family, cfg = read_hf_config(path)
    files = weight_files(path)
    model = build_model(cfg, device="meta", init=False)
    with SafetensorsFiles(*files) as stored:
        weight_map = family.weight_map(cfg)
        if not any(name.startswith(family.prefix) for name in stored.names()):
            # Saved from the base model (e.g. the original `gpt2`): names lack the prefix.
            weight_map = {k: tuple(replace(s, name=s.name.removeprefix(family.prefix)) for s in sources)
                          for k, sources in weight_map.items()}

        def ignore(name: str) -> bool:  # a tied head that was saved anyway is the embedding again
            return family.is_ignored(name) or (cfg.tie_embeddings and name == "lm_head.weight")

        load_tensors(model, stored, where=str(path), device=device, dtype=resolve_dtype(dtype),
                     weight_map=weight_map, ignore=ignore)
    model.init_buffers()
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    return model, tokenizer


# ---- writing ------------------------------------------------------------------------------
def export_family(cfg: ModelConfig) -> Family:
    """The HF family a ling config can be written as (its own, after an import), or a LingError
    naming the closest family and what it would need."""
    fitting = [f for f in FAMILIES if not f.mismatches(cfg)]
    if fitting:
        return next((f for f in fitting if f.model_type == cfg.name), fitting[0])
    closest = min(FAMILIES, key=lambda f: len(f.mismatches(cfg)))
    raise LingError(
        f"this model matches no Hugging Face family ({SUPPORTED}); the closest is {closest.architecture}, "
        f"which needs {', '.join(closest.mismatches(cfg))}"
    )


def hf_config(family: Family, model: Transformer, tokenizer: Tokenizer | None) -> dict:
    dtype = next(model.parameters()).dtype
    # Unknown ids are written as null: absent, transformers would assume its own defaults (GPT-2's 50256).
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        **family.config_to_hf(model.cfg),
        **ids,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_tensors(family: Family, model: Transformer):
    """Yield (HF name, tensor) in weight-map order: fused q/k/v split, Conv1D weights transposed,
    and zeros for what the family always stores but this model does not have."""
    params = dict(model.state_dict())
    stored = family.as_stored(model.cfg)
    shapes = parameter_shapes(stored)
    for name, sources in family.weight_map(stored).items():
        tensor = params[name] if name in params else torch.zeros(shapes[name], dtype=model.embed.weight.dtype)
        row = 0
        for source in sources:
            piece = tensor[row : row + source.rows]
            yield source.name, (piece.t() if source.transposed else piece)
            row += source.rows


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' → bytes (decimal units as transformers' max_shard_size)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise LingError(f"cannot read size '{text}' (examples: 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def save_hf_dir(model: Transformer, tokenizer: Tokenizer | None, directory: str | Path,
                max_shard_size: str = DEFAULT_MAX_SHARD_SIZE, generation_config: dict | None = None) -> Family:
    """Write `model` as a Hugging Face model directory that transformers loads with no custom code.

    Weights go to model.safetensors, or to shards plus model.safetensors.index.json when
    they exceed `max_shard_size`. Callers that need atomicity write into `atomic_dir`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    family = export_family(model.cfg)
    config = hf_config(family, model, tokenizer)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    limit = parse_size(max_shard_size)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in hf_tensors(family, model):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    index = {}
    progress = tqdm(list(zip(names, shards)), desc="writing", unit="shard", disable=None, delay=2, leave=False)
    for file, shard in progress:
        # One contiguous copy per tensor: safetensors refuses tensors that share memory (q/k/v
        # are views of one fused tensor), and the copies live only while their shard is written.
        tensors = {name: t.detach().cpu().clone(memory_format=torch.contiguous_format) for name, t in shard}
        save_file(tensors, str(directory / file), metadata={"format": "pt", "producer": PRODUCER})
        set_default_mode(directory / file)
        index.update({name: file for name, _ in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for shard in shards for _, t in shard)
        (directory / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n"
        )

    generation = dict(generation_config or {})
    if not generation:
        generation = {k: v for k, v in config.items()
                      if k in ("bos_token_id", "eos_token_id", "pad_token_id") and v is not None}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    return family
