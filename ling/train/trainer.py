"""The training loop: one loop for pretraining and every fine-tuning method.

A method decides three things and hands them to `Trainer`:
- which parameters train: those with `requires_grad` (the optimizer gets only them);
- how a batch is built: a `BatchSource` yielding `ling.data.batch.Batch` micro-batches;
- which positions count in the loss: the batch's labels (`IGNORE_INDEX` elsewhere), and
  if needed a `loss_fn` (e.g. a classification head, a preference loss over pairs), what it
  reports besides the loss (`LossMetrics`), and how weights are saved/loaded.

Everything else — mixed precision, gradient accumulation, DDP or FSDP, clipping, schedules,
evaluation, checkpoints with exact resume, Ctrl-C, metrics and the progress bar — is here
once. The loss of a step is the mean over every counted position of the global batch
(all micro-batches of all processes), so accumulation and world size do not change it.

A run never ends silently in NaN: a step whose loss or gradient norm is not finite makes no
update and, beyond `max_bad_steps` such steps, stops the run with an error naming it; a
validation loss that is not finite stops it too, before that model is saved (so a
non-finite checkpoint is never `latest` or `best`). The run directory has one writer: the
trainer holds its lock (see `RunDir.open`) from construction to the end of `fit`.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from ling.atomic import atomic_file
from ling.checkpoint import save_model_dir
from ling.data.batch import IGNORE_INDEX, Batch
from ling.dataclass_io import to_dict
from ling.errors import LingError
from ling.kernels import KernelReport, apply_training_kernels, plan_training_kernels
from ling.model import Transformer, autocast_context
from ling.train import distributed
from ling.train.allocator import reuse_freed_memory
from ling.train.checkpointing import (
    TRAIN_STATE,
    RunDir,
    intact_weights,
    load_model_weights,
    read_train_state,
    rng_state,
    seed_everything,
    set_rng_state,
)
from ling.train.config import TrainConfig
from ling.train.distributed import Dist
from ling.train.metrics import Throughput, mfu, peak_flops, peak_memory
from ling.train.optim import LRSchedule, build_optimizer
from ling.train.report import MetricsLog

QUICK_EVAL_S = 5.0
"""after Ctrl-C, the checkpoint is saved first; a validation pass follows only if it takes
less than this (seconds)"""


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


class BatchSource(Protocol):
    """Where training batches come from; its state is saved for exact resume."""

    def next_step(self) -> list[Batch]:
        """This process's micro-batches for the next optimizer step."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LossMetrics:
    """Numbers a loss reports besides itself (e.g. preference rewards), one value per example:
    summed apart for training and for evaluation, and read as means over the examples since
    the last read, across processes (a collective: every process reads together)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self._sums: dict[bool, torch.Tensor | None] = {True: None, False: None}

    def add(self, training: bool, values: dict[str, torch.Tensor]) -> None:
        first = values[self.names[0]]
        sums = [values[name].detach().float().sum() for name in self.names]
        row = torch.stack([first.new_tensor(float(first.numel()))] + sums)
        previous = self._sums[training]
        self._sums[training] = row if previous is None else previous + row

    def clear(self, training: bool) -> None:
        self._sums[training] = None

    def take(self, training: bool, dist: Dist, device: torch.device) -> dict[str, float]:
        sums = self._sums[training]
        self._sums[training] = None
        sums = distributed.all_reduce_sum(sums if sums is not None else torch.zeros(len(self.names) + 1, device=device),
                                          dist)
        count, *totals = sums.tolist()
        return {name: total / count for name, total in zip(self.names, totals)} if count else {}


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label counts."""
    logits = model(batch.tokens, batch.positions, batch.mask)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@dataclass
class StepResult:
    loss: torch.Tensor
    """mean loss over every counted position of the global batch (a device tensor: .item() syncs)"""
    grad_norm: float | None
    """global gradient norm before clipping (None without clipping)"""
    lr: float
    tokens: int
    """tokens in the global batch (all processes)"""


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    final_val_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float
    """average over the training time of this process's session (evaluation excluded)"""
    mfu: float | None
    seconds: float
    checkpoint: Path | None
    """the newest checkpoint"""
    interrupted: bool = False
    kernels: KernelReport | None = None
    """the kernels this run trained with (`ling.kernels`)"""
    max_steps: int | None = None
    """the steps the run was set to train for"""
    time_limited: bool = False
    """`train.time_limit` ended the run before max_steps"""

    def to_dict(self) -> dict:
        """summary.json: how the run ended, what it reached, where its checkpoint is."""
        return {"steps": self.step, "max_steps": self.max_steps, "tokens_seen": self.tokens_seen,
                "final_val_loss": self.final_val_loss, "best_val_loss": self.best_val_loss,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None, "interrupted": self.interrupted,
                "time_limited": self.time_limited, "kernels": self.kernels.to_dict() if self.kernels else None}


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, batches: BatchSource, val_batches: list[Batch],
                 run_dir: str | Path, *, device: torch.device, precision: str, tokenizer=None,
                 dist: Dist = Dist(), flops_per_token: float,
                 loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] = lm_loss,
                 save_weights: Callable = save_model_dir, load_weights: Callable = load_model_weights,
                 config: dict | None = None, resume_hint: str = "--resume auto",
                 init_hint: Callable[[Path], str] = lambda path: f"--init-from {path}",
                 sample_prompt: list[int] | None = None, on_eval: Callable[[int], dict] | None = None,
                 after_eval: Callable[[dict], None] | None = None, kernels: str = "auto",
                 loss_metrics: LossMetrics | None = None):
        self.cfg, self.batches, self.val_batches = cfg, batches, val_batches
        self.device, self.precision, self.tokenizer, self.dist = device, precision, tokenizer, dist
        self.flops_per_token = flops_per_token
        self.loss_fn, self.save_weights, self.load_weights = loss_fn, save_weights, load_weights
        self.loss_metrics = loss_metrics
        """what `loss_fn` reports besides the loss: joins the train and eval records and the progress line"""
        self.config, self.resume_hint, self.sample_prompt = config, resume_hint, sample_prompt
        self.init_hint = init_hint
        """the command that starts a new run from a checkpoint's weights (offered when its
        train state is unreadable)"""
        self.on_eval = on_eval
        """called on the main process after each evaluation with the step and the whole model (a
        gathered copy under FSDP); the metrics it returns join that evaluation's metrics.jsonl
        line (e.g. a fine-tuning run's accuracy)"""
        self.after_eval = after_eval
        """called on the main process with each evaluation's metrics.jsonl record once its checkpoint is
        saved; an exception it raises ends the run there (how `ling sweep` prunes a trial)"""
        if device.type == "cpu":
            reuse_freed_memory()
        self.run = RunDir(run_dir)
        if dist.is_main:  # before anything is written there
            self.run.open()
        self.model = model  # bare (sharded in place under FSDP): what is saved, loaded and sampled from
        model.to(device)
        for module in model.modules():  # the Transformer, also inside a fine-tuning wrapper
            if hasattr(module, "activation_checkpointing"):
                module.activation_checkpointing = cfg.activation_checkpointing
        self.kernels = self._apply_kernels(kernels)
        self.skeleton = None
        """under FSDP, rank 0's weightless copy of the model that gathered weights fill (to save, sample)"""
        if dist.sharded:
            from ling.train import fsdp

            if precision == "fp16":
                raise LingError("--train.parallel fsdp trains in bf16 or fp32 (fp16's gradient scaler is not "
                                "sharded): use --train.precision bf16")
            self.skeleton = fsdp.skeleton(model) if dist.is_main else None
            fsdp.shard_model(model, precision, cfg.reshard_after_forward)
        self._val_rounds = distributed.max_over_ranks(len(val_batches), dist, device)
        self.run_id = distributed.broadcast_object(os.getpid(), dist)
        """rank 0's PID, naming the temporaries every process writes into"""
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise LingError("no parameter has requires_grad: nothing to train")
        self.optimizer = build_optimizer(model, cfg, device.type)
        self.schedule = LRSchedule.from_config(cfg)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.eval_model = torch.compile(model) if cfg.compile else model
        self.train_model = distributed.wrap(self.eval_model, dist, device)
        self.metrics = MetricsLog(run_dir, enabled=dist.is_main)
        self.peak = peak_flops(device, precision)
        self.step, self.tokens_seen = 0, 0
        self.bad_steps = 0
        """steps skipped for a non-finite loss or gradient norm (see TrainConfig.max_bad_steps)"""
        self.best_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_eval_metrics: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._stop_signal: str | None = None

    def _apply_kernels(self, mode: str) -> KernelReport:
        """Swap in the kernels measured fastest for this run's shapes (`ling.kernels`): rank 0
        decides, every rank applies the same."""
        body = next(m for m in self.model.modules() if isinstance(m, Transformer))
        seq_len = self.val_batches[0].tokens.shape[1] if self.val_batches else body.cfg.context_length
        report = None
        if self.dist.is_main:
            report = plan_training_kernels(body.cfg, mode=mode, device=self.device, precision=self.precision,
                                           compile=self.cfg.compile, micro_batch=self.cfg.micro_batch, seq_len=seq_len)
        report = distributed.broadcast_object(report, self.dist)
        apply_training_kernels(self.model, report, self.device)
        return report

    # ---- the loop ---------------------------------------------------------------------
    def fit(self, resume: str | None = None, baseline_val_loss: float | None = None) -> TrainResult:
        """Train to `cfg.max_steps` (or the time limit, or a signal). `baseline_val_loss`, the
        validation loss measured before training, is recorded at step 0 of a fresh run so that
        the report's curve starts there."""
        cfg = self.cfg
        try:
            self._start(resume)
        except BaseException:
            self.run.close()
            raise
        self.metrics.start(self.step)
        self.metrics.write({"kind": "kernels", "step": self.step, **self.kernels.to_dict()})
        if baseline_val_loss is not None and self.step == 0:
            self.metrics.write({"kind": "eval", "step": 0, "val_loss": baseline_val_loss, "tokens": 0})
        meter = Throughput()
        # A progress bar on a terminal; redirected to a file, a line per log step instead of a frame per step.
        lines = self.dist.is_main and not sys.stderr.isatty()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.dist.is_main or lines, dynamic_ncols=True)
        t_start = time.perf_counter()
        first_step = self.step
        peak_refreshed = False  # a cached CPU peak probed under load reads low: re-probed once
        handlers = self._catch_signals()
        try:
            meter.start()
            while self.step < cfg.max_steps:
                result = self.train_step()
                meter.add(result.tokens)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    loss = result.loss.item()  # waits for the device, so the window's time is right
                    rate = meter.lap()
                    util = mfu(rate, self.flops_per_token, self.peak, self.dist.world_size)
                    if util is not None and util > 1 and self.device.type == "cpu" and not peak_refreshed:
                        self.peak, peak_refreshed = peak_flops(self.device, self.precision, refresh=True), True
                        util = mfu(rate, self.flops_per_token, self.peak, self.dist.world_size)
                    memory = peak_memory(self.device)
                    extra = self._take_loss_metrics(training=True)
                    self.metrics.write({"kind": "train", "step": self.step, "loss": loss, "lr": result.lr,
                                        "grad_norm": result.grad_norm, "tokens": self.tokens_seen,
                                        "tokens_per_s": rate, "mfu": util, **extra}
                                       | ({"max_memory_allocated": memory} if memory is not None else {}))
                    status = (f"loss {loss:.4f}" + _shown(extra) + f" · lr {result.lr:.2e} · {rate:,.0f} tok/s"
                              + (f" · MFU {util:.1%}" if util is not None else "")
                              + (f" · mem {memory / 2**30:.1f} GiB" if memory is not None else ""))
                    bar.set_postfix_str(status)
                    if lines:
                        elapsed = time.perf_counter() - t_start
                        eta = elapsed / (self.step - first_step) * (cfg.max_steps - self.step)
                        print(f"step {self.step}/{cfg.max_steps} · {status} · {_clock(elapsed)} elapsed, "
                              f"{_clock(eta)} left", file=sys.stderr, flush=True)
                time_up = cfg.time_limit > 0 and time.perf_counter() - t_start >= cfg.time_limit * 60
                stop = distributed.any_rank(self._stop_signal is not None or time_up, self.dist, self.device)
                if stop and self._stop_signal is not None and self.step < cfg.max_steps:
                    meter.lap()
                    self._save_on_signal(bar)
                elif stop or self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    meter.lap()
                    self._evaluate_and_save(bar)
                    meter.start()
                if stop:
                    break
        finally:
            self._restore_signals(handlers)
            bar.close()
            self.metrics.close()
            self.run.close()
        # Every rank leaves together: a rank that tore down the process group while rank 0
        # still wrote the last checkpoint and report could abort at exit.
        distributed.barrier(self.dist)
        interrupted = self._stop_signal is not None and self.step < cfg.max_steps
        time_limited = not interrupted and self.step < cfg.max_steps
        if interrupted and self.dist.is_main:
            print(f"\ninterrupted ({self._stop_signal}) at step {self.step}: checkpoint saved to "
                  f"{self.last_checkpoint}\nresume with: {self.resume_hint}", file=sys.stderr)
        return TrainResult(
            step=self.step, tokens_seen=self.tokens_seen, final_val_loss=self.last_val_loss,
            best_val_loss=self.best_val_loss, tokens_per_s=meter.average,
            mfu=mfu(meter.average, self.flops_per_token, self.peak, self.dist.world_size),
            seconds=time.perf_counter() - t_start, checkpoint=self.last_checkpoint, interrupted=interrupted,
            kernels=self.kernels, max_steps=cfg.max_steps, time_limited=time_limited,
        )

    def train_step(self) -> "StepResult":
        """One optimizer step over this process's micro-batches."""
        lr = self.schedule.set(self.optimizer, self.step)
        micro = self.batches.next_step()
        counts = torch.tensor([float(sum(b.num_targets for b in micro)), float(sum(b.num_tokens for b in micro))],
                              device=self.device)
        n_targets, n_tokens = distributed.all_reduce_sum(counts, self.dist)
        # The gradient reduction sums over processes (FSDP) or averages (DDP); scale so the
        # result is the mean over the global batch.
        scale = distributed.gradient_divisor(self.dist) / n_targets
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with distributed.accumulating(self.train_model, self.dist, last):
                with autocast_context(self.device.type, self.precision):
                    loss = self.loss_fn(self.train_model, batch.to(self.device))
                scaled = loss * scale
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
        mean_loss = distributed.all_reduce_sum(loss_sum, self.dist) / n_targets
        norm = None
        if self.cfg.grad_clip > 0:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            if hasattr(norm, "full_tensor"):  # FSDP: the norm of sharded gradients, reduced over processes
                norm = norm.full_tensor()
        # One wait for the device gives both checks (the same values on every process).
        loss_value, norm_value = torch.stack([mean_loss.float(), mean_loss.new_zeros(()) if norm is None
                                              else norm.float()]).tolist()
        grad_norm = None if norm is None else norm_value
        # Under fp16 an infinite gradient norm is the scaler's business: it skips the step and lowers the scale.
        finite = math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm)
                                                or self.scaler is not None)
        if self.scaler:
            if norm is not None:
                self._clip_gradients(norm, norm_value)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:
            if norm is not None:
                self._clip_gradients(norm, norm_value)
            self.optimizer.step()
            self.optimizer.grad_scale = None  # a clip factor is for this step only
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self._bad_step(loss_value, grad_norm)
        self.step += 1
        self.tokens_seen += int(n_tokens)
        return StepResult(loss=mean_loss, grad_norm=grad_norm, lr=lr, tokens=int(n_tokens))

    def _bad_step(self, loss: float, grad_norm: float | None) -> None:
        """A step with a non-finite loss or gradient norm made no update: allowed up to
        max_bad_steps times, then the run stops, naming the step."""
        self.bad_steps += 1
        what = f"the loss is {loss}" + (f" and the gradient norm {grad_norm}" if grad_norm is not None else "")
        if self.bad_steps > self.cfg.max_bad_steps:
            raise LingError(f"step {self.step + 1}: {what}, so training stopped without applying it "
                            f"({self._last_saved()}); lower --train.lr, check the data, or skip up to N such "
                            "steps with --train.max-bad-steps N")
        if self.dist.is_main:
            tqdm.write(f"warning: step {self.step + 1}: {what}; step skipped "
                       f"({self.bad_steps} of at most {self.cfg.max_bad_steps})", file=sys.stderr)

    def _last_saved(self) -> str:
        return f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was saved"

    def _clip_gradients(self, norm: torch.Tensor, value: float) -> None:
        """`clip_grad_norm_` without its own pass over every gradient (~1% of a small model's
        CPU step): gradients within the limit are left alone, and a fused AdamW scales the
        others as it reads them, through the `grad_scale` it takes from a `GradScaler` (it
        divides by it, and stores the scaled gradients back)."""
        if value + 1e-6 > self.cfg.grad_clip:  # clip_grad_norm_'s scale max / (norm + 1e-6) < 1
            if self.optimizer.defaults.get("fused") and self.scaler is None:
                self.optimizer.grad_scale = (norm.float() + 1e-6) / self.cfg.grad_clip
            else:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.grad_clip, norm)

    def _take_loss_metrics(self, training: bool) -> dict[str, float]:
        return {} if self.loss_metrics is None else self.loss_metrics.take(training, self.dist, self.device)

    @torch.no_grad()
    def evaluate(self, budget_s: float | None = None) -> float | None:
        """Mean loss over the fixed validation batches (all processes together); None without
        any. With `budget_s` (one process only): a progress bar, and None at once if the first
        batch says the whole pass would take longer. What the loss reports besides is then in
        `last_eval_metrics`."""
        if self.loss_metrics is not None:
            self.loss_metrics.clear(training=False)
        self.eval_model.eval()
        totals = torch.zeros(2, device=self.device)
        batches = self.val_batches
        if budget_s is not None:
            batches = tqdm(batches, desc="validation", unit="batch", leave=False, disable=not sys.stderr.isatty())
        try:
            for i, batch in enumerate(batches):
                t0 = time.perf_counter()
                with autocast_context(self.device.type, self.precision):
                    totals[0] += self.loss_fn(self.eval_model, batch.to(self.device)).float()
                totals[1] += batch.num_targets
                if budget_s is not None and i == 0:
                    totals[0].item()  # waits for the device, so that the time is right
                    if (time.perf_counter() - t0) * len(self.val_batches) > budget_s:
                        return None
            if self.dist.sharded:  # every process takes part in every forward pass: as many as the busiest
                for _ in range(self._val_rounds - len(self.val_batches)):
                    with autocast_context(self.device.type, self.precision):
                        self.eval_model(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        finally:
            if budget_s is not None:
                batches.close()
            self.eval_model.train()
        totals = distributed.all_reduce_sum(totals, self.dist)
        self.last_eval_metrics = self._take_loss_metrics(training=False)
        return float(totals[0] / totals[1]) if totals[1] > 0 else None

    def _save_on_signal(self, bar) -> None:
        """Ctrl-C / SIGTERM: save at once (the weights as they are, the best kept as it was), then
        a validation loss only if a pass is quick (a few seconds), with a progress bar."""
        self.save_checkpoint(is_best=False)
        if self.dist.enabled or not self.dist.is_main or not self.val_batches:
            return
        val_loss = self.evaluate(budget_s=QUICK_EVAL_S)
        if val_loss is None:
            bar.write(f"step {self.step}: checkpoint saved; validation skipped (a pass takes over "
                      f"{QUICK_EVAL_S:g} s here; `ling eval` measures it)", file=sys.stderr)
            return
        self.last_val_loss = val_loss
        self.metrics.write({"kind": "eval", "step": self.step, "val_loss": val_loss, "tokens": self.tokens_seen,
                            **self.last_eval_metrics})
        bar.write(f"step {self.step}: checkpoint saved; val loss {val_loss:.4f}", file=sys.stderr)
        self.metrics.plot()

    def _evaluate_and_save(self, bar) -> None:
        val_loss = self.evaluate()
        if val_loss is not None and not math.isfinite(val_loss):
            raise LingError(f"step {self.step}: the validation loss is {val_loss}: the weights are no longer finite, "
                            f"so they were not saved ({self._last_saved()}); lower --train.lr or check the model "
                            "settings")
        is_best = val_loss is not None and (self.best_val_loss is None or val_loss < self.best_val_loss)
        if is_best:
            self.best_val_loss = val_loss
        self.last_val_loss = val_loss
        record = {"kind": "eval", "step": self.step, "val_loss": val_loss, "tokens": self.tokens_seen,
                  **self.last_eval_metrics}
        plain = self.plain_model()
        if self.cfg.sample_tokens > 0 and self.sample_prompt and self.tokenizer is not None and self.dist.is_main:
            record["sample"] = self.sample(plain)
        extra = self.on_eval(self.step, plain) if self.on_eval is not None and self.dist.is_main else {}
        record.update(extra)
        self.metrics.write(record)
        if self.dist.is_main:
            shown = _shown({**self.last_eval_metrics, **extra})
            if val_loss is not None or shown:
                bar.write(f"step {self.step}:" + (f" val loss {val_loss:.4f}" if val_loss is not None else "")
                          + (" (best)" if is_best else "") + shown)
            if "sample" in record:
                bar.write(f"sample: {record['sample']!r}")
        self._save(is_best, plain)
        self.metrics.plot()
        if self.after_eval is not None and self.dist.is_main:
            self.after_eval(record)

    def plain_model(self) -> torch.nn.Module | None:
        """The whole model, as save hooks, sampling and evaluation hooks take it: the model itself,
        or under FSDP a copy with the gathered weights on rank 0 (None elsewhere; a collective)."""
        if not self.dist.sharded:
            return self.model
        from ling.train import fsdp

        plain = fsdp.plain_copy(self.model, self.skeleton)
        return plain.to(self.device) if plain is not None else None

    def sample(self, model: torch.nn.Module) -> str:
        """A short text sample from the model (its own RNG: training randomness is untouched)."""
        from ling.infer.generate import generate_tokens

        ids = list(generate_tokens(model, self.sample_prompt, self.cfg.sample_tokens, temperature=0.8,
                                   top_k=50, seed=self.cfg.seed))
        return self.tokenizer.decode(self.sample_prompt + ids)

    # ---- checkpoints and resume ---------------------------------------------------------
    def save_checkpoint(self, is_best: bool = False) -> None:
        """Save everything exact resume needs (a collective: every process calls it)."""
        self._save(is_best, self.plain_model())

    def _save(self, is_best: bool, plain: torch.nn.Module | None) -> None:
        """Save a checkpoint whose weights are `plain`'s (see `plain_model`). Under FSDP every
        process first writes its shard of the training state into a temporary directory, which
        rank 0 moves into the checkpoint as it writes the gathered weights beside it."""
        rng = distributed.gather_objects(rng_state(), self.dist)
        shards = None
        if self.dist.sharded:
            from ling.train import fsdp

            shards = self.run.checkpoints / f".step-{self.step}.shards.tmp-{self.run_id}"
            if self.dist.is_main:
                shutil.rmtree(shards, ignore_errors=True)
            distributed.barrier(self.dist)
            fsdp.save_sharded(self.model, self.optimizer, shards)

        def write(directory: Path) -> None:
            self.save_weights(plain, self.tokenizer, directory)
            if shards is not None:
                os.rename(shards, directory / fsdp.SHARDS)

        if self.dist.is_main:
            state = {
                "step": self.step, "tokens_seen": self.tokens_seen, "parallel": self.dist.parallel,
                "optimizer": None if shards else self.optimizer.state_dict(),
                "scheduler": {"step": self.step, **to_dict(self.schedule)},
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "sampler": self.batches.state_dict(),
                "rng": rng, "world_size": self.dist.world_size,
                "best_val_loss": self.best_val_loss, "last_val_loss": self.last_val_loss,
                "bad_steps": self.bad_steps, "train_config": to_dict(self.cfg),
            }
            self.last_checkpoint = self.run.save(
                self.step, write, state,
                keep_last=self.cfg.keep_last, is_best=is_best,
            )
        distributed.barrier(self.dist)

    def _start(self, resume: str | None) -> None:
        """Resume from a checkpoint, or check the run dir is free and start fresh."""
        if self.dist.is_main:
            self.run.root.mkdir(parents=True, exist_ok=True)
            self.run.clean_temporaries()
        distributed.barrier(self.dist)
        found = None
        if resume == "auto":
            found = self.run.newest_valid()
            if found is None and self.run.step_dirs():
                raise LingError(self._nothing_resumable())
            if found is None and self.dist.is_main:
                print(f"no checkpoint to resume in {self.run.root}: starting fresh", file=sys.stderr)
        elif resume:
            found = (Path(resume), read_train_state(Path(resume)))
        elif self.run.step_dirs():
            raise LingError(f"{self.run.root} already holds checkpoints: add --resume auto to continue that run, "
                            "or choose a new --out")
        if found is not None:
            self.run.refuse_to_overwrite(found[1]["step"], self.init_hint)
        if self.dist.is_main and self.config is not None:
            with atomic_file(self.run.root / "config.yaml") as f:
                yaml.safe_dump(self.config, f, sort_keys=False, allow_unicode=True)
        if found is None:
            seed_everything(self.cfg.seed + self.dist.rank)
            return
        path, state = found
        self._load_training_state(path, state)
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["sampler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val_loss, self.last_val_loss = state["best_val_loss"], state["last_val_loss"]
        self.bad_steps = state.get("bad_steps", 0)
        self.last_checkpoint = path
        if state["world_size"] == self.dist.world_size:
            set_rng_state(state["rng"][self.dist.rank])
        else:
            if self.dist.is_main:
                print(f"warning: the checkpoint was written by {state['world_size']} process(es), this run has "
                      f"{self.dist.world_size}: random streams are re-seeded", file=sys.stderr)
            seed_everything(self.cfg.seed + self.dist.rank + 1_000_003 * self.step)
        changed = [k for k, v in to_dict(self.cfg).items() if state["train_config"].get(k) != v]
        if changed and self.dist.is_main:
            print(f"note: resuming with changed train settings: {', '.join(changed)}", file=sys.stderr)
        self.metrics.resume_at(self.step)
        if self.dist.is_main:
            print(f"resumed from {path} (step {self.step}, {self.tokens_seen:,} tokens seen)", file=sys.stderr)

    def _load_training_state(self, path: Path, state: dict) -> None:
        """The weights and optimizer state of a checkpoint, from whichever parallel mode saved it:
        a sharded one (FSDP) on any number of processes, sharded or not; a whole one (one
        process or DDP) into a model that is not sharded."""
        saved_sharded = state.get("parallel") == "fsdp"
        if self.dist.sharded and not saved_sharded:
            raise LingError(f"{path} was saved without FSDP, which keeps the whole optimizer state in "
                            f"{TRAIN_STATE}, not sharded: resume it with "
                            "--train.parallel ddp (or one process), or start from its weights with "
                            f"{self.init_hint(path)}")
        if saved_sharded:
            from ling.train import fsdp

            if not self.dist.sharded:
                self.load_weights(self.model, path)
            fsdp.load_sharded(self.model, self.optimizer, path / fsdp.SHARDS, weights=self.dist.sharded)
        else:
            self.load_weights(self.model, path)
            self.optimizer.load_state_dict(state["optimizer"])

    def _nothing_resumable(self) -> str:
        """The error when --resume auto finds checkpoint directories but none to continue:
        nothing is started over them (that would overwrite them); their weights may be saved."""
        intact = [path for _, path in reversed(self.run.step_dirs()) if intact_weights(path)]
        if intact:
            return (f"no checkpoint in {self.run.checkpoints} can be resumed (see the warnings above), but the weights "
                    f"of {intact[0]} are intact: start a new run from them with: {self.init_hint(intact[0])}")
        return (f"{self.run.checkpoints} holds checkpoint directories but none can be resumed or has intact weights "
                "(see the warnings above): move them away, or choose a new --out")

    # ---- Ctrl-C -------------------------------------------------------------------------
    def _catch_signals(self) -> dict:
        """First SIGINT/SIGTERM: finish the step, save, stop. A second SIGINT aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            if self.dist.is_main:
                tqdm.write(f"{self._stop_signal}: finishing this step and saving a checkpoint "
                           "(Ctrl-C again to abort without saving)", file=sys.stderr)

        return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signals(handlers: dict) -> None:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def _shown(metrics: dict) -> str:
    """' · name value' for each metric, for the progress line and the evaluation lines."""
    return "".join(f" · {k} {v:.4g}" if isinstance(v, float) else f" · {k} {v}" for k, v in metrics.items())
