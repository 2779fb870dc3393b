"""Hugging Face interoperability: one module per model family (config and weight-name maps)."""

from ling.errors import LingError


def load_hf_checkpoint(path, device="cpu", dtype=None):
    raise LingError(f"{path}: loading Hugging Face model directories is not supported yet")
