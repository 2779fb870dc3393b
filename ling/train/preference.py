"""Preference tuning (DPO and relatives) as an objective for the one trainer core.

The trainer's loop is unchanged: `PreferenceLoss` is its `loss_fn`. Given a micro-batch of
pairs (`ling.data.preference_batches`: chosen rows, then rejected rows, one forward) it sums
each completion's token log-probabilities, compares them with the reference's, and returns
the sum of the per-pair losses — the trainer divides by the number of pairs in the global
batch, so accumulation and world size do not change the step.

Losses (`--dpo.loss`), with log-ratios ρ = log πθ(y|x) − log πref(y|x) over completion tokens:

- sigmoid (DPO): −(1−ε)·log σ(β(ρc − ρr)) − ε·log σ(−β(ρc − ρr)); ε = label smoothing (cDPO);
- ipo: (ρc/|yc| − ρr/|yr| − 1/(2β))², log-ratios averaged per token as the IPO authors and trl do;
- hinge (SLiC): max(0, 1 − β(ρc − ρr));
- simpo (no reference): the sigmoid loss on β(l̄c − l̄r − γ/β), l̄ = mean token log-prob;
- orpo (no reference): −l̄c − λ·log σ(log odds(yc) − log odds(yr)), odds = p/(1−p) of l̄.

The reference costs no second model: with LoRA it is the same weights with the adapters
switched off (`ling.lora.adapters_disabled`), computed in the same step; with full
fine-tuning the reference log-probabilities of every pair are computed once before training
(`reference_logps`) and kept in the run directory, which a resumed run reads back.

Rewards are logged under trl's names: `rewards/chosen` = β·ρc, `rewards/rejected` = β·ρr,
`rewards/margins` (their difference) and `rewards/accuracies` (share of pairs with a positive
margin); without a reference, β (ORPO: λ) times the mean token log-prob, as trl's CPO/ORPO.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ling.atomic import atomic_path
from ling.data.batch import IGNORE_INDEX
from ling.data.preference_batches import PreferenceBatch
from ling.errors import LingError
from ling.lora import adapters_disabled
from ling.model import autocast_context
from ling.train.trainer import LossMetrics

LossType = Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"]
REFERENCE_FREE = ("simpo", "orpo")
REFERENCE_FILE = "reference_logps.safetensors"
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclass
class DPOConfig:
    """Preference-tuning objective (used with --task dpo)."""

    loss: LossType = "sigmoid"
    """sigmoid = DPO; ipo; hinge = SLiC; simpo and orpo need no reference model"""
    beta: float = 0.1
    """how far the policy may move from the reference (higher = stays closer); SimPO's reward scale"""
    label_smoothing: float = 0.0
    """sigmoid and simpo: the assumed share of pairs whose preference is flipped (cDPO), in [0, 0.5)"""
    gamma: float = 0.5
    """simpo: the target reward margin γ"""
    orpo_lambda: float = 0.1
    """orpo: weight λ of the odds-ratio term next to the chosen answer's NLL"""

    def __post_init__(self):
        if not self.beta > 0:
            raise LingError(f"--dpo.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise LingError(f"--dpo.label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise LingError(f"--dpo.label-smoothing applies to the sigmoid and simpo losses, not {self.loss}")
        if self.orpo_lambda < 0:
            raise LingError(f"--dpo.orpo-lambda cannot be negative, got {self.orpo_lambda}")

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


# ---- the losses, on per-pair log-probabilities --------------------------------------------
def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def sigmoid_loss(chosen_logratios, rejected_logratios, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7), with cDPO's label smoothing."""
    return _smoothed_sigmoid(beta * (chosen_logratios - rejected_logratios), label_smoothing)


def ipo_loss(chosen_logratios, rejected_logratios, chosen_len, rejected_len, beta: float):
    """IPO (Azar et al. 2023, eq. 17; τ = β), on per-token log-ratios."""
    return (chosen_logratios / chosen_len - rejected_logratios / rejected_len - 1 / (2 * beta)) ** 2


def hinge_loss(chosen_logratios, rejected_logratios, beta: float):
    """SLiC's hinge (Zhao et al. 2023) on the DPO margin."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def simpo_loss(chosen_logps, rejected_logps, chosen_len, rejected_len, beta: float, gamma: float,
               label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, eq. 6): mean token log-probs, a target margin γ, no reference."""
    margin = chosen_logps / chosen_len - rejected_logps / rejected_len
    return _smoothed_sigmoid(beta * margin - gamma, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation on either side of −ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps, rejected_logps, chosen_len, rejected_len, lam: float):
    """ORPO (Hong et al. 2024, eqs. 2-7): the chosen answer's mean NLL plus λ times the
    odds-ratio loss, both on mean token log-probs; no reference."""
    chosen_mean, rejected_mean = chosen_logps / chosen_len, rejected_logps / rejected_len
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return -chosen_mean - lam * F.logsigmoid(log_odds)


def pair_losses(cfg: DPOConfig, logps: torch.Tensor, lengths: torch.Tensor, ref_logps: torch.Tensor | None):
    """(per-pair loss, chosen reward, rejected reward) from (B, 2) summed log-probs [chosen,
    rejected], their (B, 2) completion lengths and the reference's (B, 2) log-probs."""
    (chosen, rejected), (n_chosen, n_rejected) = logps.unbind(1), lengths.unbind(1)
    if cfg.loss == "simpo":
        losses = simpo_loss(chosen, rejected, n_chosen, n_rejected, cfg.beta, cfg.gamma, cfg.label_smoothing)
        return losses, cfg.beta * chosen.detach() / n_chosen, cfg.beta * rejected.detach() / n_rejected
    if cfg.loss == "orpo":
        losses = orpo_loss(chosen, rejected, n_chosen, n_rejected, cfg.orpo_lambda)
        return losses, cfg.orpo_lambda * chosen.detach() / n_chosen, cfg.orpo_lambda * rejected.detach() / n_rejected
    chosen_ratio, rejected_ratio = (logps - ref_logps).unbind(1)
    if cfg.loss == "sigmoid":
        losses = sigmoid_loss(chosen_ratio, rejected_ratio, cfg.beta, cfg.label_smoothing)
    elif cfg.loss == "ipo":
        losses = ipo_loss(chosen_ratio, rejected_ratio, n_chosen, n_rejected, cfg.beta)
    else:
        losses = hinge_loss(chosen_ratio, rejected_ratio, cfg.beta)
    return losses, cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()


# ---- log-probabilities of a batch's completions ---------------------------------------------
def completion_logps(model, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) summed log-probabilities of each pair's [chosen, rejected] completion tokens
    (one forward over all 2B rows), and the (B, 2) number of those tokens."""
    logits = model(batch.tokens, batch.positions, batch.mask)
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="none").view(batch.labels.shape)
    lengths = (batch.labels != IGNORE_INDEX).sum(1).float()
    as_pairs = lambda x: x.view(2, -1).T  # rows are [chosen…, rejected…]  # noqa: E731
    return as_pairs(token_logps.sum(1)), as_pairs(lengths)


class PreferenceLoss:
    """The trainer's `loss_fn` for --task dpo: summed per-pair loss of a micro-batch; its
    rewards go to `metrics` (kept apart for training and evaluation)."""

    def __init__(self, cfg: DPOConfig, reference: Literal["adapters", "table", "none"], base=None):
        self.cfg, self.reference = cfg, reference
        self.base = base
        """the bare model whose adapters are switched off for the LoRA reference"""
        self.table: torch.Tensor | None = None
        """(pairs, 2) reference log-probs, for reference == 'table' (`reference_logps`)"""
        self.metrics = LossMetrics(REWARDS)

    def reference_logps(self, batch: PreferenceBatch) -> torch.Tensor | None:
        if self.reference == "none":
            return None
        if self.reference == "table":
            if self.table is None:
                raise LingError("internal: the reference log-probabilities were not computed before training")
            return self.table[batch.pair_ids]
        with torch.no_grad(), adapters_disabled(self.base):
            return completion_logps(self.base, batch)[0]

    def __call__(self, model, batch: PreferenceBatch) -> torch.Tensor:
        ref = self.reference_logps(batch)  # first: its activations are freed before the policy's are kept
        logps, lengths = completion_logps(model, batch)
        losses, chosen, rejected = pair_losses(self.cfg, logps, lengths, ref)
        margins = chosen - rejected
        self.metrics.add(model.training, {"rewards/chosen": chosen, "rewards/rejected": rejected,
                                          "rewards/margins": margins, "rewards/accuracies": (margins > 0).float()})
        return losses.sum()


# ---- full fine-tuning: the reference, once, kept with the run -------------------------------
def data_key(batches: list[PreferenceBatch], base: str, precision: str) -> str:
    """What the reference log-probs depend on: the base, the precision and every pair's tokens."""
    digest = hashlib.sha256(json.dumps([base, precision]).encode())
    for batch in batches:
        for tensor in (batch.tokens, batch.labels, batch.pair_ids):
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def reference_logps(model, batches: list[PreferenceBatch], n_pairs: int, run_dir: Path, key: str,
                    device: torch.device, precision: str, write: bool = True) -> torch.Tensor:
    """(n_pairs, 2) log-probs of every pair's completions under `model` as it is now (the
    reference), read from RUN_DIR/reference_logps.safetensors when it was computed for the same
    `key`, else computed (a progress bar) and saved there."""
    path = run_dir / REFERENCE_FILE
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return f.get_tensor("logps").to(device)
        except (OSError, SafetensorError):  # an unreadable file is recomputed
            pass
    table = torch.zeros(n_pairs, 2)
    was_training = model.training
    model.eval()
    for batch in tqdm(batches, desc="reference log-probs", unit="batch", dynamic_ncols=True, disable=not write):
        with autocast_context(device.type, precision):
            logps, _ = completion_logps(model, batch.to(device))
        table[batch.pair_ids] = logps.float().cpu()
    model.train(was_training)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"logps": table}, str(tmp), metadata={"key": key})
    return table.to(device)
