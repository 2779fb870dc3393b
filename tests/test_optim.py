"""AdamW parameter groups and learning-rate schedules."""

import math

import pytest

from ling.config import ModelConfig
from ling.model import build_model
from ling.train.config import TrainConfig
from ling.train.optim import LRSchedule, build_optimizer, param_groups


def schedule(kind, **kw):
    return LRSchedule(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, kind=kind, **kw)


def test_warmup_is_linear_up_to_the_peak_at_the_last_warmup_step():
    s = schedule("cosine")
    assert [s(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


@pytest.mark.parametrize("kind, expected", [
    # after warmup, progress = (step + 1 - 10) / 100: 0.25 at step 34, 0.5 at 59, 1 at 109
    ("cosine", {34: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 59: 0.55, 109: 0.1}),
    ("linear", {34: 0.775, 59: 0.55, 109: 0.1}),
    # wsd: 22 decay steps (20 % of 110) start at step 88
    ("wsd", {10: 1.0, 87: 1.0, 98: 0.55, 109: 0.1}),
    ("constant", {10: 1.0, 59: 1.0, 109: 1.0}),
])
def test_schedule_values_at_known_steps(kind, expected):
    s = schedule(kind)
    assert {step: s(step) for step in expected} == pytest.approx(expected)


def test_schedule_holds_min_lr_past_the_end():
    assert schedule("cosine")(500) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices_and_each_tied_weight_once():
    model = build_model(ModelConfig.from_name("shakespeare-char", n_layer=1, bias="all"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # the tied lm_head is listed as embed
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        ["embed.weight", "pos_embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.o.weight",
         "blocks.0.mlp.up.weight", "blocks.0.mlp.down.weight"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_frozen_parameters_are_not_optimised():
    model = build_model(ModelConfig.from_name("tiny"))
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("blocks.1.")
    optimizer = build_optimizer(model, TrainConfig(), "cpu")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert optimizer.defaults["fused"]
