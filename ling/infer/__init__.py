"""Inference: the batched, streaming `Engine` over the model's KV cache, its sampler and detokenizer."""

from ling.infer.engine import Completion, Delta, Engine
from ling.infer.sampling import SamplingParams, TokenLogprob

__all__ = ["Completion", "Delta", "Engine", "SamplingParams", "TokenLogprob"]
