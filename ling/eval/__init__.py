"""Evaluation: loss, perplexity and bits per byte; exact match of generated answers; classifier accuracy."""
