"""Hugging Face interoperability: one module per model family (config and weight-name maps,
both directions), and HF model directories read and written through them (`checkpoint`)."""

from ling.hf.checkpoint import FAMILIES, export_family, is_hf_dir, load_hf_checkpoint, save_hf_dir

__all__ = ["FAMILIES", "export_family", "is_hf_dir", "load_hf_checkpoint", "save_hf_dir"]
