"""Evaluation: loss, perplexity and bits per byte; exact match of generated answers; classifier accuracy;
standard benchmarks through lm-evaluation-harness (`harness`, `tasks`)."""
