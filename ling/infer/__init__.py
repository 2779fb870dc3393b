"""Inference: sampling and generation on the model's KV cache."""
