"""Preference tuning (`ling finetune --task dpo`): each loss against its formula and against trl's
own code, the reference (LoRA: the base exactly; full: computed once and reused), the first
step at ln 2, accumulation invariance, and bad records named by file:line."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ling import cli
from ling.checkpoint import save_model_dir
from ling.config import ModelConfig
from ling.data.preference import encode_pair, read_pairs
from ling.data.preference_batches import PreferenceBatches, collate_pairs
from ling.data.synthetic import make_examples, write_jsonl
from ling.lora import LoRAConfig, adapters_disabled, apply_lora
from ling.model import build_model
from ling.tokenizer import Tokenizer
from ling.train.config import TrainConfig
from ling.train.finetune import FinetuneArgs, run_finetune
from ling.train.preference import (
    REFERENCE_FILE,
    DPOConfig,
    PreferenceLoss,
    completion_logps,
    hinge_loss,
    ipo_loss,
    orpo_loss,
    pair_losses,
    reference_logps,
    sigmoid_loss,
    simpo_loss,
)
from ling.train.trainer import Trainer
from tests.test_cli_bad_inputs import one_error_line

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!+0123456789\n"
LN2 = torch.tensor(math.log(2))

# Fixed log-probabilities: policy chosen -5 (4 tokens), rejected -7 (2 tokens); reference -6 and -6.
CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED = torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.0])
N_CHOSEN, N_REJECTED = torch.tensor([4.0]), torch.tensor([2.0])


# ---- the formulas ------------------------------------------------------------------------------
def test_losses_equal_their_papers_formulas():
    rho_c, rho_r = CHOSEN - REF_CHOSEN, REJECTED - REF_REJECTED  # +1, -1
    # DPO: -log σ(β(ρc − ρr)) = log(1 + e^-0.2)
    torch.testing.assert_close(sigmoid_loss(rho_c, rho_r, 0.1), torch.tensor([0.5981388693815918]))
    # cDPO: 0.9·log(1 + e^-0.2) + 0.1·log(1 + e^0.2)
    torch.testing.assert_close(sigmoid_loss(rho_c, rho_r, 0.1, 0.1), torch.tensor([0.6181388693815918]))
    # IPO: (1/4 − (−1)/2 − 1/(2·0.1))² = (0.75 − 5)²
    torch.testing.assert_close(ipo_loss(rho_c, rho_r, N_CHOSEN, N_REJECTED, 0.1), torch.tensor([18.0625]))
    # hinge: max(0, 1 − 0.1·2)
    torch.testing.assert_close(hinge_loss(rho_c, rho_r, 0.1), torch.tensor([0.8]))
    # SimPO (β 2, γ 0.5): -log σ(2·(−5/4 + 7/2) − 0.5) = log(1 + e^-4)
    torch.testing.assert_close(simpo_loss(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED, 2.0, 0.5),
                               torch.tensor([0.018149927917809738]))
    # ORPO (λ 0.1): 1.25 − 0.1·log σ(2.25 − log(1 − e^-1.25) + log(1 − e^-3.5))
    torch.testing.assert_close(orpo_loss(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED, 0.1), torch.tensor([1.2574683867421248]))


def test_rewards_are_beta_times_log_ratios():
    logps, lengths = torch.stack([CHOSEN, REJECTED], 1), torch.stack([N_CHOSEN, N_REJECTED], 1)
    ref = torch.stack([REF_CHOSEN, REF_REJECTED], 1)
    _, chosen, rejected = pair_losses(DPOConfig(beta=0.1), logps, lengths, ref)
    torch.testing.assert_close((chosen, rejected), (torch.tensor([0.1]), torch.tensor([-0.1])))
    _, chosen, rejected = pair_losses(DPOConfig(loss="simpo", beta=2.0), logps, lengths, None)  # no reference
    torch.testing.assert_close((chosen, rejected), (torch.tensor([-2.5]), torch.tensor([-7.0])))


# ---- against trl's own code -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    from trl import DPOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return SimpleNamespace(dpo=DPOTrainer, cpo=CPOTrainer, orpo=ORPOTrainer)


PAIRS = dict(chosen=torch.tensor([-5.0, -9.0, -3.0]), rejected=torch.tensor([-7.0, -4.0, -3.5]),
             ref_chosen=torch.tensor([-6.0, -8.0, -2.0]), ref_rejected=torch.tensor([-6.0, -5.0, -4.5]),
             n_chosen=torch.tensor([4.0, 3.0, 1.0]), n_rejected=torch.tensor([2.0, 5.0, 1.0]))


def _trl_dpo_loss(trl, loss_type: str, beta: float) -> torch.Tensor:
    """DPOTrainer._compute_loss on a stand-in model whose per-token log-probs sum to PAIRS'."""
    B, T = 3, 7
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for row, n in enumerate(torch.cat([PAIRS["n_chosen"], PAIRS["n_rejected"]]).long().tolist()):
        completion_mask[row, T - n:] = 1
    log_probs = torch.zeros(2 * B, T - 1)
    log_probs[:, -1] = torch.cat([PAIRS["chosen"], PAIRS["rejected"]])
    zeros = torch.zeros(2 * B, T - 1)
    model = lambda **kwargs: SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,  # noqa: E731
                                             is_top1=zeros.bool())
    from collections import defaultdict

    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x))
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": PAIRS["ref_chosen"],
              "ref_rejected_logps": PAIRS["ref_rejected"]}
    return trl.dpo._compute_loss(fake, model, inputs, False)


def _ours(cfg: DPOConfig) -> torch.Tensor:
    logps = torch.stack([PAIRS["chosen"], PAIRS["rejected"]], 1)
    lengths = torch.stack([PAIRS["n_chosen"], PAIRS["n_rejected"]], 1)
    ref = torch.stack([PAIRS["ref_chosen"], PAIRS["ref_rejected"]], 1)
    return pair_losses(cfg, logps, lengths, ref)[0]


@pytest.mark.parametrize("loss, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 0.5), ("hinge", 0.1),
                                        ("hinge", 1.0)])
def test_reference_losses_match_trls_dpo_trainer(trl, loss, beta):
    torch.testing.assert_close(_ours(DPOConfig(loss=loss, beta=beta)).mean(), _trl_dpo_loss(trl, loss, beta))


def _cpo(trl, loss_type: str, beta: float, label_smoothing: float, gamma: float = 0.5):
    return SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))


def test_label_smoothing_and_simpo_match_trl(trl):
    rho_c, rho_r = PAIRS["chosen"] - PAIRS["ref_chosen"], PAIRS["rejected"] - PAIRS["ref_rejected"]
    # cDPO: trl's conservative sigmoid (CPO's form, on the log-ratios)
    expected, _, _ = trl.cpo.cpo_loss(_cpo(trl, "sigmoid", 0.1, 0.2), rho_c, rho_r)
    torch.testing.assert_close(_ours(DPOConfig(beta=0.1, label_smoothing=0.2)), expected)
    # SimPO: trl's CPOTrainer with loss_type simpo, on mean token log-probs
    mean_c, mean_r = PAIRS["chosen"] / PAIRS["n_chosen"], PAIRS["rejected"] / PAIRS["n_rejected"]
    for beta, gamma, smoothing in ((2.0, 0.5, 0.0), (2.5, 1.0, 0.1)):
        expected, chosen, rejected = trl.cpo.cpo_loss(_cpo(trl, "simpo", beta, smoothing, gamma), mean_c, mean_r)
        cfg = DPOConfig(loss="simpo", beta=beta, gamma=gamma, label_smoothing=smoothing)
        torch.testing.assert_close(_ours(cfg), expected)
        logps = torch.stack([PAIRS["chosen"], PAIRS["rejected"]], 1)
        lengths = torch.stack([PAIRS["n_chosen"], PAIRS["n_rejected"]], 1)
        torch.testing.assert_close(pair_losses(cfg, logps, lengths, None)[1:], (chosen, rejected))


def test_orpo_matches_trl(trl):
    mean_c, mean_r = PAIRS["chosen"] / PAIRS["n_chosen"], PAIRS["rejected"] / PAIRS["n_rejected"]
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    odds_term, _, _, _, _ = trl.orpo.odds_ratio_loss(fake, mean_c, mean_r)
    # trl: loss = NLL(chosen) − mean(λ·log σ(log odds)); per pair the NLL is −mean_c
    torch.testing.assert_close(_ours(DPOConfig(loss="orpo", orpo_lambda=0.25)), -mean_c - odds_term)


# ---- the reference, the first step and accumulation, on a tiny model ---------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train_char([ALPHABET])
    torch.manual_seed(0)
    save_model_dir(build_model(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, context_length=64)), tok, path)
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_jsonl(make_examples("echo", 48), path, "preference-text")
    return path


def _args(base, data, out, **overrides):
    train = dict(max_steps=1, batch_tokens=8 * 64, micro_batch=8, lr=1e-2, min_lr=1e-3, warmup_steps=0, eval_every=1,
                 eval_batches=2, log_every=1, precision="fp32", seed=0)
    train.update(overrides.pop("train", {}))
    return FinetuneArgs(base=str(base), data=str(data), out=str(out), device="cpu", task="dpo", max_seq_len=64,
                        kernels="reference", samples=1, sample_tokens=4, train=TrainConfig(**train), **overrides)


def _records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_lora_reference_is_the_base_model_exactly(base, pairs_file):
    tok = Tokenizer.load(base)
    from ling.checkpoint import load_checkpoint

    model, _ = load_checkpoint(base)
    plain = copy.deepcopy(model).eval()
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # trained adapters: the policy is no longer the base
    model.eval()
    batch = collate_pairs([encode_pair(p, tok, 64, i) for i, p in enumerate(read_pairs(pairs_file).pairs[:6])], 0)
    with torch.no_grad():
        base_logps, _ = completion_logps(plain, batch)
        policy_logps, _ = completion_logps(model, batch)
        with adapters_disabled(model):
            reference, _ = completion_logps(model, batch)
        after, _ = completion_logps(model, batch)
    assert torch.equal(reference, base_logps)
    assert not torch.allclose(policy_logps, base_logps)
    assert torch.equal(after, policy_logps)  # switched back on when the block ends


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sigmoid_loss_starts_at_ln2(base, pairs_file, tmp_path, method):
    _, summary = run_finetune(_args(base, pairs_file, tmp_path / "run", method=method), show_summary=False)
    (first,) = _records(tmp_path / "run", "train")
    torch.testing.assert_close(torch.tensor(first["loss"]), LN2)
    torch.testing.assert_close(torch.tensor(summary["base_val_loss"]), LN2)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        torch.testing.assert_close(torch.tensor(first[name]), torch.tensor(0.0))  # fp32's tolerance: policy = reference
    if method == "lora":  # the reference is the same forward with B = 0: bit for bit, so no pair wins
        assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    # (full: the reference was computed before training in other batches, so its log-probs may
    # differ in the last bits and a tie may count either way)
    before, evaluation = _records(tmp_path / "run", "eval")  # the loss measured before training, then step 1's
    assert before["step"] == 0
    torch.testing.assert_close(torch.tensor(before["val_loss"]), LN2)
    assert set(summary["val_rewards"]) <= set(evaluation) and "rewards/accuracies" in evaluation
    assert (tmp_path / "run" / REFERENCE_FILE).exists() == (method == "full")


def test_full_reference_is_kept_and_reused_on_resume(base, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    run_finetune(_args(base, pairs_file, out, train=dict(max_steps=2)), show_summary=False)
    stamp = (out / REFERENCE_FILE).stat().st_mtime_ns
    capsys.readouterr()
    run_finetune(_args(base, pairs_file, out, resume="auto", train=dict(max_steps=3)), show_summary=False)
    assert "reference log-probs" not in capsys.readouterr().err  # no progress bar: read back, not recomputed
    assert (out / REFERENCE_FILE).stat().st_mtime_ns == stamp
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]


def _one_step(base, pairs_file, run_dir, micro_batch: int, accumulation: int):
    """One SGD step (lr 1: the update is the gradient) over the same 8 pairs."""
    from ling.checkpoint import load_checkpoint

    model, tok = load_checkpoint(base)
    pairs = [encode_pair(p, tok, 64, i) for i, p in enumerate(read_pairs(pairs_file).pairs)]
    batches = PreferenceBatches(pairs, micro_batch, 0, seed=3, accumulation=accumulation)
    loss = PreferenceLoss(DPOConfig(), "table")
    cfg = TrainConfig(max_steps=1, micro_batch=micro_batch, lr=1.0, min_lr=1.0, warmup_steps=0, schedule="constant",
                      grad_clip=0.0, precision="fp32", weight_decay=0.0)
    trainer = Trainer(model, cfg, batches, [], run_dir, device=torch.device("cpu"), precision="fp32", tokenizer=tok,
                      flops_per_token=1.0, loss_fn=loss, loss_metrics=loss.metrics, kernels="reference")
    every = PreferenceBatches(pairs, 8, 0, shuffle=False).fixed_batches()
    table = reference_logps(model, every, len(pairs), run_dir, "k", torch.device("cpu"), "fp32", write=False)
    # A reference that is not the policy, so that the gradient is not the ln-2 point's.
    loss.table = table + torch.linspace(-1, 1, table.numel()).view_as(table)
    trainer.optimizer = torch.optim.SGD(trainer.params, lr=1.0)
    before = [p.detach().clone() for p in trainer.params]
    result = trainer.train_step()
    return result.loss, [p.detach() - b for p, b in zip(trainer.params, before)], loss.metrics.take(True, trainer.dist, trainer.device)


def test_accumulation_1x8_equals_8x1(base, pairs_file, tmp_path):
    loss_a, update_a, rewards_a = _one_step(base, pairs_file, tmp_path / "a", micro_batch=8, accumulation=1)
    loss_b, update_b, rewards_b = _one_step(base, pairs_file, tmp_path / "b", micro_batch=1, accumulation=8)
    torch.testing.assert_close(loss_a, loss_b)
    assert any(u.abs().max() > 1e-4 for u in update_a)
    torch.testing.assert_close(update_a, update_b)
    assert rewards_a == pytest.approx(rewards_b, abs=1e-6)


# ---- bad input ------------------------------------------------------------------------------------
BAD = [
    ({"prompt": "Say it.\n", "chosen": "abc"}, "missing 'rejected'"),
    ({"prompt": "Say it.\n", "rejected": "abc"}, "missing 'chosen'"),
    ({"prompt": "Say it.\n", "chosen": "abc", "rejected": "abc"}, "'chosen' and 'rejected' are the same"),
    ({"prompt": "Say it.\n", "chosen": " ", "rejected": "abc"}, "'chosen' is an empty completion"),
    ({"prompt": "a" * 80, "chosen": "ABC", "rejected": "abc"}, "the prompt is 80 tokens, which leaves no room"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "no"}]}, "'chosen' is an empty completion"),
]


@pytest.mark.parametrize("record, reason", BAD)
def test_a_bad_record_is_one_line_naming_file_and_line(base, pairs_file, tmp_path, capsys, record, reason):
    data = tmp_path / "bad.jsonl"
    good = pairs_file.read_text().splitlines()[:3]
    if isinstance(record["prompt"], list):
        good = [json.dumps({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "A"}],
                            "rejected": [{"role": "assistant", "content": "a"}]})] * 3
    data.write_text("\n".join(good[:2] + [json.dumps(record)] + good[2:]) + "\n")
    line = one_error_line(capsys, ["finetune", "--task", "dpo", "--base", base, "--data", data, "--out", tmp_path / "o",
                                   "--device", "cpu"])
    assert line.startswith(f"error: {data}:3: {reason}"), line
    assert not (tmp_path / "o").exists()


def test_bad_records_are_counted_with_skip_bad_records(base, pairs_file, tmp_path):
    data = tmp_path / "mixed.jsonl"
    text = [r for r, _ in BAD if isinstance(r["prompt"], str)]
    data.write_text(pairs_file.read_text() + "".join(json.dumps(r) + "\n" for r in text))
    _, summary = run_finetune(_args(base, data, tmp_path / "run", skip_bad_records=True), show_summary=False)
    assert summary["skipped_records"] == len(text)
    assert summary["train_examples"] + summary["val_examples"] == 48


def test_the_command_fails_in_one_line_in_its_own_process(base, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "Say it.\n", "chosen": "abc", "rejected": "abc"}) + "\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "ling", "finetune", "--task", "dpo", "--base", str(base), "--data",
                           str(data), "--out", str(tmp_path / "o"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {data}:1: 'chosen' and 'rejected' are the same, so there is no preference to learn "
        "[preference text format] (fix it, or pass --skip-bad-records to skip such records)"]


@pytest.mark.parametrize("flags, expected", [
    (["--dpo.beta", "0"], "error: --dpo.beta must be positive, got 0.0"),
    (["--dpo.label-smoothing", "0.5"], "error: --dpo.label-smoothing must be in [0, 0.5), got 0.5"),
    (["--dpo.loss", "ipo", "--dpo.label-smoothing", "0.1"],
     "error: --dpo.label-smoothing applies to the sigmoid and simpo losses, not ipo"),
    (["--data-format", "alpaca"], "error: --data-format alpaca is not a preference format"),
    (["--pack"], "error: --pack does not apply to --task dpo"),
])
def test_bad_dpo_flags_are_one_line(base, pairs_file, tmp_path, capsys, flags, expected):
    line = one_error_line(capsys, ["finetune", "--task", "dpo", "--base", base, "--data", pairs_file, "--out",
                                   tmp_path / "o", "--device", "cpu", *flags])
    assert line.startswith(expected), line
