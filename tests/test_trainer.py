"""The trainer core: what a step computes, checkpoints, and resume bookkeeping."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from ling.checkpoint import load_checkpoint
from ling.config import ModelConfig
from ling.data.batch import IGNORE_INDEX, Batch
from ling.data.sampler import PretrainSampler, validation_batches
from ling.errors import LingError
from ling.model import build_model
from ling.tokenizer import Tokenizer
from ling.train.checkpointing import RunDir
from ling.train.config import TrainConfig
from ling.train.trainer import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and on a busy machine, by far)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CFG = ModelConfig.from_name("tiny", vocab_size=64, context_length=16)
TOKENS = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)


def make_trainer(tmp_path, micro_batch=16, accumulation=1, batches=None, model=None, **train):
    train = {"max_steps": 4, "batch_tokens": 16 * 16, "micro_batch": micro_batch, "warmup_steps": 0,
             "eval_every": 2, "eval_batches": 2, "log_every": 1, "precision": "fp32", **train}
    cfg = TrainConfig(**train)
    torch.manual_seed(0)
    model = model or build_model(CFG)
    batches = batches or PretrainSampler(TOKENS, 16, micro_batch, accumulation, seed=1)
    return Trainer(model, cfg, batches, validation_batches(TOKENS, 16, 4, 2), tmp_path / "run",
                   device=torch.device("cpu"), precision="fp32",
                   flops_per_token=CFG.flops_per_token(16), tokenizer=Tokenizer.train_char(["abc"]))


@pytest.mark.parametrize("limit", [1e-3, 1e6])
def test_gradients_over_the_clip_norm_are_scaled_to_it_and_others_are_left_alone(tmp_path, limit):
    trainer = make_trainer(tmp_path, grad_clip=limit)
    reference = make_trainer(tmp_path / "reference", grad_clip=0)  # clipped by hand below
    seen, step = [], trainer.optimizer.step

    def step_and_look():  # the fused AdamW scales the gradients as it reads them, and stores them
        step()
        seen.append(float(torch.nn.utils.get_total_norm([p.grad for p in trainer.params])))

    trainer.optimizer.step = step_and_look
    reference_step = reference.optimizer.step
    reference.optimizer.step = lambda: (torch.nn.utils.clip_grad_norm_(reference.params, limit), reference_step())
    for _ in range(2):
        reported = trainer.train_step().grad_norm  # the norm before clipping
        reference.train_step()
        assert reported > 1e-2
        assert seen[-1] == pytest.approx(min(limit, reported), rel=1e-5)
    for p, q in zip(trainer.params, reference.params):  # the same update as clip_grad_norm_ + AdamW
        torch.testing.assert_close(p, q)


def test_a_step_loss_is_the_mean_over_the_global_batch_and_accumulation_does_not_change_it(tmp_path):
    whole = make_trainer(tmp_path / "a", micro_batch=16, accumulation=1)
    (batch,) = PretrainSampler(TOKENS, 16, 16, seed=1).next_step()
    with torch.no_grad():
        expected = F.cross_entropy(whole.model(batch.tokens).flatten(0, 1), batch.labels.flatten())
    step = whole.train_step()
    loss, grad_norm = step.loss, step.grad_norm
    fp32_sums = dict(rel=1e-5)  # sums in another order: ~80 fp32 eps of the loss
    assert float(loss) == pytest.approx(float(expected), **fp32_sums)

    split = make_trainer(tmp_path / "b", micro_batch=8, accumulation=2)
    step2 = split.train_step()
    loss2, grad_norm2 = step2.loss, step2.grad_norm
    assert step.tokens == step2.tokens == 16 * 16
    assert float(loss2) == pytest.approx(float(loss), **fp32_sums)
    assert grad_norm2 == pytest.approx(grad_norm, **fp32_sums)
    for p, q in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(p, q)


class ListSource:
    """A BatchSource over fixed micro-batches (what a fine-tuning collate would produce)."""

    def __init__(self, micro):
        self.micro, self.steps = micro, 0

    def next_step(self):
        self.steps += 1
        return self.micro

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_only_labelled_positions_count_and_they_weigh_the_same_across_micro_batches(tmp_path):
    tokens = torch.from_numpy(TOKENS[:32].astype(np.int64)).view(2, 16)
    labels = torch.roll(tokens, -1, dims=1)
    labels[0, :13] = IGNORE_INDEX  # 3 counted positions in row 0, 10 in row 1
    labels[1, :6] = IGNORE_INDEX
    rows = [Batch(tokens[i : i + 1], labels[i : i + 1]) for i in range(2)]
    together = make_trainer(tmp_path / "a", batches=ListSource([Batch(tokens, labels)]))
    with torch.no_grad():
        logits = together.model(tokens)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    step = together.train_step()
    loss, grad_norm = step.loss, step.grad_norm
    fp32_sums = dict(rel=1e-5)  # sums in another order: ~80 fp32 eps of the loss
    assert float(loss) == pytest.approx(float(expected), **fp32_sums)
    apart = make_trainer(tmp_path / "b", batches=ListSource(rows))
    step2 = apart.train_step()
    loss2, grad_norm2 = step2.loss, step2.grad_norm
    assert float(loss2) == pytest.approx(float(loss), **fp32_sums)
    assert grad_norm2 == pytest.approx(grad_norm, **fp32_sums)


def test_frozen_parameters_stay_put_and_the_rest_trains(tmp_path):
    torch.manual_seed(0)
    model = build_model(CFG)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("blocks.1.mlp")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model=model)
    trainer.train_step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != name.startswith("blocks.1.mlp"), name


def test_checkpoint_layout_pointers_and_pruning(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=8, keep_last=2)
    result = trainer.fit()
    run = tmp_path / "run"
    assert (run / "latest").resolve() == run / "checkpoints" / "step-8" == result.checkpoint
    evals = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    best_step = min(evals, key=lambda r: r["val_loss"])["step"]
    assert (run / "best").resolve().name == f"step-{best_step}"
    # the newest keep_last=2, plus the best
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step-6", "step-8", f"step-{best_step}"}
    ckpt = run / "latest"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_state.pt"]
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert "embed.weight" in names and "lm_head.weight" not in names  # tied head stored once
    assert not any(n.startswith(("_orig_mod.", "module.")) for n in names)
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert {"step", "tokens_seen", "optimizer", "scheduler", "sampler", "rng", "files"} <= set(state)
    assert (state["step"], state["tokens_seen"], state["sampler"]) == (8, 8 * 256, {"epoch": 0, "index": 128})
    assert {"python", "numpy", "torch"} <= set(state["rng"][0])
    model, tokenizer = load_checkpoint(ckpt)
    for name, p in trainer.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p, rtol=0, atol=0)
    assert (run / "report.png").exists() and (run / "metrics.jsonl").exists()


def test_a_torn_or_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path, capsys):
    make_trainer(tmp_path, max_steps=6, keep_last=3).fit()
    run = RunDir(tmp_path / "run")
    weights = run.checkpoints / "step-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # torn
    (run.checkpoints / "step-4" / "train_state.pt").write_bytes(b"garbage")
    path, state = run.newest_valid()
    assert path.name == "step-2" and state["step"] == 2
    err = capsys.readouterr().err
    assert "skipping checkpoint step-6" in err and "checksum" in err
    assert "skipping checkpoint step-4" in err and "unreadable" in err
    # Resuming from step-2 would overwrite step-4, whose weights are intact: refused, with a way out.
    with pytest.raises(LingError, match=r"step-4 is not a checkpoint ling can resume or replace.*"
                                        r"start a new run from its intact weights: --init-from .*step-4"):
        make_trainer(tmp_path, max_steps=6).fit(resume="auto")
    assert (run.checkpoints / "step-4" / "train_state.pt").read_bytes() == b"garbage"
    (run.checkpoints / "step-4").rename(tmp_path / "step-4-kept")
    resumed = make_trainer(tmp_path, max_steps=6)
    resumed.fit(resume="auto")  # step-6 was ling's own (torn): replaced
    assert "resumed from" in capsys.readouterr().err and resumed.step == 6
    assert run.newest_valid()[0].name == "step-6"


def test_resume_auto_on_an_empty_run_starts_fresh_and_a_used_run_needs_resume(tmp_path, capsys):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(resume="auto")
    assert "starting fresh" in capsys.readouterr().err and trainer.step == 2
    with pytest.raises(LingError, match="already holds checkpoints: add --resume auto"):
        make_trainer(tmp_path, max_steps=2).fit()


def test_pruning_keeps_the_newest_checkpoints_and_the_best(tmp_path):
    run = RunDir(tmp_path)
    for step in (1, 2, 3, 4):
        run.save(step, lambda d: (d / "model.safetensors").write_bytes(b"w"), {"step": step},
                 keep_last=2, is_best=step == 2)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-2", "step-3", "step-4"]
    assert (run.pointed("best").name, run.pointed("latest").name) == ("step-2", "step-4")


def test_activation_checkpointing_recomputes_to_the_same_result(tmp_path):
    plain = make_trainer(tmp_path / "a")
    recomputed = make_trainer(tmp_path / "b", activation_checkpointing=True)
    assert recomputed.model.activation_checkpointing
    a, b = plain.train_step(), recomputed.train_step()
    assert float(b.loss) == float(a.loss) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-6)


@pytest.mark.slow
def test_compiled_training_matches_eager_evaluates_samples_and_saves_plain_names(tmp_path, capsys):
    # A GPT-2 MLP, whose GELU is itself compiled when training: compiled within compiled;
    # biases, which a compiled step adds apart from their matmuls.
    gpt2_like = dataclasses.replace(CFG, mlp="gelu", position="learned", norm="layernorm", bias="all")

    def trainer_for(path, **train):
        torch.manual_seed(0)
        return make_trainer(path, model=build_model(gpt2_like), **train)

    eager, compiled = trainer_for(tmp_path / "eager"), trainer_for(tmp_path / "compiled", compile=True)
    for _ in range(2):  # the second loss follows the first step's gradients (embeddings included)
        expected, got = eager.train_step(), compiled.train_step()
        assert float(got.loss) == pytest.approx(float(expected.loss), rel=1e-5)
        assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-4)
    torch.testing.assert_close(compiled.model.pos_embed.weight, eager.model.pos_embed.weight)
    torch.testing.assert_close(compiled.model.blocks[0].mlp.up.bias, eager.model.blocks[0].mlp.up.bias)
    trainer = trainer_for(tmp_path, compile=True, max_steps=1, sample_tokens=5)
    trainer.sample_prompt = [1, 2]
    result = trainer.fit()
    assert result.final_val_loss is not None and "sample:" in capsys.readouterr().out
    with safe_open(tmp_path / "run" / "latest" / "model.safetensors", "pt") as f:
        assert not any(n.startswith("_orig_mod.") for n in f.keys())


def test_a_cpu_peak_that_reads_too_low_is_reprobed_once_so_mfu_stays_a_fraction(tmp_path, monkeypatch):
    # a peak cached while the cores were busy would show an MFU above 100 % for ever
    asked = []

    def fake_peak(device, precision, refresh=False):
        asked.append(refresh)
        return 1e15 if refresh else 1.0

    monkeypatch.setattr("ling.train.trainer.peak_flops", fake_peak)
    trainer = make_trainer(tmp_path)
    trainer.fit()
    train_lines = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "train"]
    assert asked == [False, True]
    assert len(train_lines) == 4 and all(0 < r["mfu"] < 1 for r in train_lines)


@pytest.mark.parametrize("limit", [1e-3, 1e6])
def test_the_gradient_scaler_path_with_the_scaler_disabled_takes_the_plain_step(tmp_path, limit):
    """The fp16 plumbing (scale, unscale, clip, scaler step and update) with a disabled scaler —
    what `GradScaler` is where it cannot scale — updates the weights as the plain path does,
    clipped (limit 1e-3) or not."""
    plain = make_trainer(tmp_path / "plain", grad_clip=limit)
    scaled = make_trainer(tmp_path / "scaled", grad_clip=limit)
    scaled.scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):
        expected, got = plain.train_step(), scaled.train_step()
        assert float(got.loss) == pytest.approx(float(expected.loss), rel=1e-6)
        assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-6)
    for (name, p), q in zip(plain.model.named_parameters(), scaled.model.parameters()):
        torch.testing.assert_close(q, p, msg=name)
