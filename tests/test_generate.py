"""Single-sequence sampling on the KV cache."""

import torch

from ling.config import ModelConfig
from ling.infer.engine import Engine
from ling.infer.generate import generate_tokens
from ling.model import build_model


def _greedy_without_cache(model, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_greedy_with_cache_equals_greedy_without_cache():
    model = build_model(ModelConfig.from_name("tiny")).eval()
    prompt = [5, 9, 2, 7]
    out = list(generate_tokens(model, prompt, 12, temperature=0))
    with torch.no_grad():
        assert out == _greedy_without_cache(model, prompt, 12)


def test_same_seed_same_tokens_different_seed_differs():
    model = build_model(ModelConfig.from_name("tiny"))
    runs = [list(generate_tokens(model, [1, 2, 3], 30, temperature=1.0, seed=s)) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_generation_stops_at_a_stop_id_and_goes_past_the_context():
    model = build_model(ModelConfig.from_name("tiny")).eval()
    greedy = list(generate_tokens(model, [1, 2], 10, temperature=0))
    stopped = list(generate_tokens(model, [1, 2], 10, temperature=0, stop_ids=(greedy[2],)))
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]
    long = list(generate_tokens(model, list(range(60)), 100, temperature=0))
    assert len(long) == 100  # past the context (64) in a sliding window


def test_a_compiled_model_is_sampled_through_its_bare_module():
    model = build_model(ModelConfig.from_name("tiny")).eval()
    compiled = torch.compile(model)  # e.g. the trainer's: decoding must not trace it step by step
    assert Engine(compiled).model is model
    assert list(generate_tokens(compiled, [1, 2, 3], 8, temperature=0)) == list(generate_tokens(model, [1, 2, 3], 8, temperature=0))
