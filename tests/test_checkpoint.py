"""Checkpoint directories: exact save/load, slice-by-slice streaming, clear errors on bad files."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import ling.weights
from ling.checkpoint import load_checkpoint, save_model_dir
from ling.config import ModelConfig
from ling.errors import LingError
from ling.model import build_model
from ling.weights import SafetensorsFiles


@pytest.fixture
def ckpt(tmp_path):
    model = build_model(ModelConfig.from_name("tiny", tie_embeddings=False))
    save_model_dir(model, None, tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_load_copies_in_small_slices_exactly(ckpt, monkeypatch, dtype):
    model, path = ckpt
    monkeypatch.setattr(ling.weights, "COPY_CHUNK_BYTES", 100)  # many slices per tensor
    loaded, _ = load_checkpoint(path, dtype=dtype)
    expected = {k: v.to(torch.bfloat16) if dtype else v for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_transposed_and_stacked_sources_fill_one_parameter(tmp_path):
    a, b = torch.randn(3, 4), torch.randn(4, 2)  # rows 0-2 from a as is, rows 3-4 from b transposed
    save_file({"a": a, "b": b}, tmp_path / "x.safetensors")
    out = torch.empty(5, 4, dtype=torch.float64)
    with SafetensorsFiles(tmp_path / "x.safetensors") as files:
        files.read_into("a", out[:3])
        files.read_into("b", out[3:], transposed=True)
    assert torch.equal(out, torch.cat([a, b.t()]).double())


def _header_bytes(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("content, reason", [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 10**9) + b"{}", "header length 1000000000 does not fit"),
    (struct.pack("<Q", 5) + b"{nope", "header is not JSON"),
    (_header_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}) + b"\x00" * 8,
     "tensor 'w' claims bytes 0..16"),
    (_header_bytes({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}), "entry for tensor 'w' is malformed"),
])
def test_corrupt_files_are_named_with_the_reason(ckpt, content, reason):
    _, path = ckpt
    (path / "model.safetensors").write_bytes(content)
    with pytest.raises(LingError, match="model.safetensors: not a valid safetensors file") as error:
        load_checkpoint(path)
    assert reason in str(error.value)


def test_missing_unexpected_and_misshapen_tensors_are_named(ckpt):
    model, path = ckpt
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights = path / "model.safetensors"

    save_file({k: v for k, v in tensors.items() if k != "final_norm.weight"}, weights)
    with pytest.raises(LingError, match="missing tensor\\(s\\) 'final_norm.weight'"):
        load_checkpoint(path)
    save_file({**tensors, "extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(LingError, match="unexpected tensor\\(s\\) 'extra.weight'"):
        load_checkpoint(path)
    save_file({**tensors, "final_norm.weight": torch.ones(31)}, weights)
    with pytest.raises(LingError, match=r"'final_norm.weight' has shape \(31,\), the model expects \(32,\)"):
        load_checkpoint(path)
