"""Hugging Face checkpoints load as ling models that compute exactly what transformers computes.

For every family and option: logits on a padded batch of varied lengths (fp32, ≤ 1e-4)
and 20 greedy tokens equal to `generate(do_sample=False)`. The HF directory is passed
to `load_checkpoint`, as every command does with a checkpoint argument.
"""

import pytest
import torch

from ling.checkpoint import load_checkpoint
from ling.infer.generate import generate_tokens
from tests.hf_models import VARIANTS, ling_logits, max_diff_over_valid, padded_batch, save_hf_model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, ling model loaded from its save_pretrained directory)."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, directory)
    ours, _ = load_checkpoint(directory)
    return hf, ours.eval()


def test_logits_equal_transformers_on_a_padded_batch(pair):
    hf, ours = pair
    tokens, valid = padded_batch([11, 6, 1])
    with torch.no_grad():
        expected = hf(input_ids=tokens, attention_mask=valid.long()).logits
    got = ling_logits(ours, tokens, valid)
    assert expected.abs().max() > 1.0  # random weights: logits large enough that a mapping slip would show
    assert max_diff_over_valid(got, expected, valid) <= 1e-4


def test_greedy_continuation_equals_generate(pair):
    hf, ours = pair
    prompt = [5, 17, 42, 8, 63, 21]
    hf.generation_config.eos_token_id = None  # never stop early: compare all 20 tokens
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    got = list(generate_tokens(ours, prompt, max_new_tokens=20, temperature=0))
    assert got == expected[0, len(prompt):].tolist()


def test_bf16_load_converts_every_tensor_and_is_as_accurate_as_transformers_in_bf16(tmp_path):
    hf = save_hf_model("llama3-rope-scaling-tied", tmp_path)
    ours, _ = load_checkpoint(tmp_path, dtype="bf16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.lm_head.weight is ours.embed.weight
    tokens, valid = padded_batch([9, 4])
    with torch.no_grad():
        exact = hf(input_ids=tokens, attention_mask=valid.long()).logits
        hf_bf16 = hf.to(torch.bfloat16)(input_ids=tokens, attention_mask=valid.long()).logits.float()
    ours_bf16 = ling_logits(ours.eval(), tokens, valid).float()
    assert max_diff_over_valid(ours_bf16, exact, valid) <= 1.5 * max_diff_over_valid(hf_bf16, exact, valid)
