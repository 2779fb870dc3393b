"""Training never ends silently in NaN, a run directory has one writer, and resume / pruning never
delete or overwrite what ling did not write."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ling.config import ModelConfig
from ling.data.sampler import PretrainSampler, validation_batches
from ling.errors import LingError
from ling.model import build_model
from ling.tokenizer import Tokenizer
from ling.train.checkpointing import TRAIN_STATE, RunDir
from ling.train.config import TrainConfig
from ling.train.trainer import Trainer, lm_loss
from tests.train_helpers import one_thread_env, write_dataset

CFG = ModelConfig.from_name("tiny", vocab_size=64, context_length=16)
TOKENS = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(run_dir, loss_fn=lm_loss, **train):
    train = {"max_steps": 4, "batch_tokens": 16 * 16, "micro_batch": 16, "warmup_steps": 0, "eval_every": 2,
             "eval_batches": 2, "log_every": 1, "precision": "fp32", "lr": 1e-2, **train}
    torch.manual_seed(0)
    return Trainer(build_model(CFG), TrainConfig(**train), PretrainSampler(TOKENS, 16, 16, 1, seed=1),
                   validation_batches(TOKENS, 16, 4, 2), run_dir, device=torch.device("cpu"), precision="fp32",
                   flops_per_token=CFG.flops_per_token(16), tokenizer=Tokenizer.train_char(["abc"]), loss_fn=loss_fn)


class NaNLoss:
    """lm_loss, except NaN in the given steps (1-based, counting calls of one micro-batch per step)."""

    def __init__(self, *steps):
        self.steps, self.calls = set(steps), 0

    def __call__(self, model, batch):
        loss = lm_loss(model, batch)
        if model.training:
            self.calls += 1
            if self.calls in self.steps:
                return loss * float("nan")
        return loss


def params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---- never silently NaN ----------------------------------------------------------------------------
def test_a_non_finite_loss_stops_the_run_naming_the_step_before_any_update(tmp_path):
    trainer = make_trainer(tmp_path / "run", NaNLoss(3), max_steps=6)
    seen = []
    step = trainer.train_step
    trainer.train_step = lambda: (seen.append(params(trainer)), step())[1]
    with pytest.raises(LingError, match=r"^step 3: the loss is nan and the gradient norm nan, so training stopped "
                                        r"without applying it \(the last checkpoint is .*step-2\); lower --train.lr"):
        trainer.fit()
    assert same(params(trainer), seen[-1])  # the bad step changed nothing
    run = RunDir(tmp_path / "run")
    assert [p.name for _, p in run.step_dirs()] == ["step-2"]
    assert run.pointed("latest").name == run.pointed("best").name == "step-2"
    RunDir(tmp_path / "run").open()  # the lock was released


def test_up_to_max_bad_steps_are_skipped_and_the_next_one_stops(tmp_path, capsys):
    trainer = make_trainer(tmp_path / "a", NaNLoss(2), max_steps=4, max_bad_steps=1)
    trainer.train_step()
    before = params(trainer)
    result = trainer.train_step()  # step 2: NaN, skipped
    assert same(params(trainer), before) and trainer.step == 2 and trainer.bad_steps == 1
    assert torch.isnan(result.loss)
    assert "warning: step 2: the loss is nan and the gradient norm nan; step skipped (1 of at most 1)" in \
        capsys.readouterr().err
    trainer.train_step()
    assert not same(params(trainer), before)  # training goes on
    with pytest.raises(LingError, match="^step 3: the loss is nan"):
        make_trainer(tmp_path / "b", NaNLoss(2, 3), max_bad_steps=1).fit()


def test_a_non_finite_gradient_norm_with_a_finite_loss_is_a_bad_step(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    hook = trainer.model.embed.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(LingError, match=r"^step 1: the loss is [0-9.]+ and the gradient norm (inf|nan), so"):
        trainer.fit()
    hook.remove()


def test_a_non_finite_validation_loss_is_never_saved_nor_best(tmp_path):
    trainer = make_trainer(tmp_path / "run", max_steps=6)
    evaluate = trainer.evaluate
    trainer.evaluate = lambda: evaluate() if trainer.step < 4 else float("nan")
    with pytest.raises(LingError, match=r"^step 4: the validation loss is nan: the weights are no longer finite, "
                                        r"so they were not saved \(the last checkpoint is .*step-2\)"):
        trainer.fit()
    run = RunDir(tmp_path / "run")
    assert [p.name for _, p in run.step_dirs()] == ["step-2"] and run.pointed("best").name == "step-2"


# ---- one writer ---------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_pid_and_the_lock_ends_with_the_run(tmp_path):
    first = make_trainer(tmp_path / "run", max_steps=2)
    with pytest.raises(LingError, match=rf"run is in use by another ling run \(PID {os.getpid()}\): wait for it"):
        make_trainer(tmp_path / "run", max_steps=2)
    first.fit()
    make_trainer(tmp_path / "run", max_steps=4).fit(resume="auto")


def test_ling_pretrain_in_another_process_is_refused(tmp_path):
    data = write_dataset(tmp_path / "data")
    run = RunDir(tmp_path / "run")
    run.open()  # this process writes the run
    try:
        proc = subprocess.run([sys.executable, "-m", "ling", "pretrain", "--data", str(data),
                               "--out", str(tmp_path / "run"), "--model.name", "tiny", "--resume", "auto"],
                              capture_output=True, text=True, env=one_thread_env(), timeout=120)
    finally:
        run.close()
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'run'} is in use by another ling run (PID {os.getpid()}): wait for it to finish, "
        "or choose another --out")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".ling.lock"]


def test_run_files_are_not_written_through_a_planted_symlink(tmp_path):
    (tmp_path / "run").mkdir()
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("precious\n")
    (tmp_path / "run" / "metrics.jsonl").symlink_to(elsewhere)
    with pytest.raises(LingError, match=r"run/metrics.jsonl is a symlink: ling does not write run files through"):
        make_trainer(tmp_path / "run")
    assert elsewhere.read_text() == "precious\n"


# ---- resume and pruning touch only what ling wrote -----------------------------------------------
def test_pruning_through_a_symlinked_checkpoints_dir_leaves_the_users_folders(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(mine)
    make_trainer(tmp_path / "run", max_steps=2, eval_every=1, keep_last=3).fit()
    (mine / "step-1" / "my-notes.txt").write_text("mine too")  # the user keeps notes in a checkpoint
    make_trainer(tmp_path / "run", max_steps=6, eval_every=1, keep_last=1).fit(resume="auto")
    best = RunDir(tmp_path / "run").pointed("best").name
    assert sorted(p.name for p in mine.iterdir()) == sorted({"notes", "step-1", "step-6", best})
    assert (mine / "notes" / "keep.txt").read_text() == "mine"
    assert (mine / "step-1" / "my-notes.txt").read_text() == "mine too"
    assert "left" in capsys.readouterr().err


def test_resume_auto_with_no_resumable_checkpoint_destroys_nothing_and_offers_the_weights(tmp_path, capsys):
    make_trainer(tmp_path / "run", max_steps=4).fit()
    run = RunDir(tmp_path / "run")
    for _, path in run.step_dirs():
        (path / TRAIN_STATE).write_bytes(b"garbage")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != "metrics.jsonl"}
    capsys.readouterr()
    with pytest.raises(LingError, match=r"no checkpoint in .*checkpoints can be resumed \(see the warnings above\), "
                                        r"but the weights of .*step-4 are intact: start a new run from them with: "
                                        r"--init-from .*step-4$"):
        make_trainer(tmp_path / "run", max_steps=6).fit(resume="auto")
    assert "starting fresh" not in capsys.readouterr().err
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != "metrics.jsonl"}
    assert before.keys() <= after.keys() and all(after[p] == data for p, data in before.items())


def test_resume_auto_never_starts_fresh_over_directories_it_cannot_read(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step-3").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-3" / "thesis.tex").write_text("mine")
    with pytest.raises(LingError, match="holds checkpoint directories but none can be resumed or has intact weights"):
        make_trainer(tmp_path / "run").fit(resume="auto")
    assert (tmp_path / "run" / "checkpoints" / "step-3" / "thesis.tex").read_text() == "mine"


def test_temporaries_of_a_killed_run_are_cleaned_at_the_next_start(tmp_path):
    make_trainer(tmp_path / "run", max_steps=2).fit()
    run = RunDir(tmp_path / "run")
    stale = run.checkpoints / ".step-4.tmp-999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    os.symlink("checkpoints/step-2", tmp_path / "run" / ".latest.tmp-999999")
    make_trainer(tmp_path / "run", max_steps=4).fit(resume="auto")
    assert not stale.exists() and not (tmp_path / "run" / ".latest.tmp-999999").is_symlink()


def test_with_a_gradient_scaler_an_infinite_gradient_is_the_scalers_and_a_nan_loss_still_counts(tmp_path):
    """The fp16 path (CUDA in real runs; the same GradScaler logic on CPU here)."""
    trainer = make_trainer(tmp_path / "run", NaNLoss(3), max_bad_steps=1, grad_clip=1.0)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    overflow = [True]
    trainer.model.embed.weight.register_hook(lambda grad: grad * float("inf") if overflow[0] else grad)
    before = params(trainer)
    trainer.train_step()  # an fp16-style overflow: the scaler skips the step and halves its scale
    assert same(params(trainer), before) and trainer.bad_steps == 0 and trainer.scaler.get_scale() == 512.0
    overflow[0] = False
    trainer.train_step()
    assert not same(params(trainer), before) and trainer.bad_steps == 0
    trainer.train_step()  # step 3: a NaN loss is a bad step under the scaler too
    assert trainer.bad_steps == 1
