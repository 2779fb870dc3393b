"""Every command on one NVIDIA GPU: mixed precision, SDPA backends, the KV cache and CUDA
graphs, compiled training, LoRA, the server, the quickstart, memory figures and MFU.

All of it is marked `cuda`: without a GPU it is skipped (listed, with the reason; see
conftest.py). `benchmarks/gpu_check.sh` runs `pytest -m cuda` on a GPU machine.
Tolerances come from the dtype: a bf16 or fp16 step is compared with the fp32 one within a
few units of that dtype's machine epsilon (each output rounds its inputs to it once).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from ling.config import ModelConfig
from ling.data.sampler import PretrainSampler, validation_batches
from ling.infer.engine import Engine
from ling.infer.sampling import SamplingParams
from ling.kernels import plan_training_kernels
from ling.kernels.cuda_attention import BACKENDS
from ling.kernels.training import ATTENTION
from ling.model import build_model
from ling.serve.server import ServeArgs
from ling.tokenizer import Tokenizer
from ling.train import metrics
from ling.train.config import TrainConfig
from ling.train.trainer import Trainer
from tests.serving import live_server, make_checkpoint

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
# Head size 32 (flash and memory-efficient SDPA take it); a context long enough for several blocks of them.
CFG = ModelConfig.from_name("tiny", vocab_size=256, context_length=128, n_embd=128, n_head=4)
TOKENS = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16)
EPS = {"bf16": torch.finfo(torch.bfloat16).eps, "fp16": torch.finfo(torch.float16).eps}


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 references in full fp32 (an in-process `ling pretrain` turns TF32 on for the process)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def make_trainer(path, precision="fp32", cfg=CFG, kernels="auto", **train):
    train = {"max_steps": 4, "batch_tokens": 8 * 128, "micro_batch": 8, "warmup_steps": 0, "eval_every": 2,
             "eval_batches": 2, "log_every": 1, "precision": precision, "lr": 1e-3, **train}
    torch.manual_seed(0)
    model = build_model(cfg)
    return Trainer(model, TrainConfig(**train), PretrainSampler(TOKENS, 128, 8, 1, seed=1),
                   validation_batches(TOKENS, 128, 8, 2), path, device=CUDA, precision=precision,
                   flops_per_token=cfg.flops_per_token(128), tokenizer=Tokenizer.train_char(["abc"]),
                   kernels=kernels)


def train_lines(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_step_matches_fp32_within_the_dtypes_precision(tmp_path, precision):
    """Two steps (the second from the first update's weights); fp16 through the gradient scaler."""
    reference = make_trainer(tmp_path / "fp32", kernels="reference")
    mixed = make_trainer(tmp_path / precision, precision, kernels="reference")
    assert (mixed.scaler is not None) == (precision == "fp16")
    tolerance = 8 * EPS[precision]  # relative; the loss is a mean over many rounded logits
    for _ in range(2):
        expected, got = reference.train_step(), mixed.train_step()
        assert float(got.loss) == pytest.approx(float(expected.loss), rel=tolerance)
        assert got.grad_norm == pytest.approx(expected.grad_norm, rel=4 * tolerance)
    assert mixed.bad_steps == 0
    if precision == "fp16":  # the scaler took both steps (no overflow) and kept its scale
        assert mixed.scaler.get_scale() == torch.amp.GradScaler("cuda").get_scale()
    # weights and optimizer state stay fp32 under autocast
    assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}


def test_the_sdpa_backend_is_timed_on_cuda_and_pinned(tmp_path):
    report = plan_training_kernels(CFG, mode="auto", device=CUDA, precision="bf16", compile=False, micro_batch=8,
                                   seq_len=128)
    choice = next(c for c in report.choices if c.part == ATTENTION)
    assert choice.how in ("measured", "cached")
    assert choice.picked in {"default", *BACKENDS}
    assert {"default", "flash", "efficient", "math"} <= set(choice.seconds)  # bf16, head size 32: all of them run
    trainer = make_trainer(tmp_path / "auto", "bf16")
    attention = type(trainer.model.blocks[0].attn).__name__
    assert attention == ("Attention" if trainer.kernels.picked(ATTENTION) == "default"
                         else f"SDPA{trainer.kernels.picked(ATTENTION).title()}Attention")
    # the pinned backend computes what the plain model does
    plain = make_trainer(tmp_path / "plain", "bf16", kernels="reference")
    batch = plain.val_batches[0].to(CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(trainer.model(batch.tokens), plain.model(batch.tokens), rtol=4 * EPS["bf16"],
                                   atol=4 * EPS["bf16"])


def greedy_without_cache(model, prompt, n):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens], device=CUDA))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def decoder():
    """A random model with clear logit margins (greedy picks do not flip on rounding)."""
    torch.manual_seed(0)
    return build_model(dataclasses.replace(CFG, init_std=0.3, tie_embeddings=False), device=CUDA).eval()


PROMPTS = [[5], list(range(3, 60)), [9, 2, 7, 7, 1]]


def test_kv_cache_decoding_equals_the_full_forward(decoder):
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    expected = [greedy_without_cache(decoder, p, 16) for p in PROMPTS]
    engine = Engine(decoder, max_batch_size=3)
    assert [c.token_ids for c in engine.generate(PROMPTS, params)] == expected
    # the logits of a cached decode step are the full forward's at that position
    full = decoder(torch.tensor([PROMPTS[1]], device=CUDA))[0, -1]
    cache_engine = Engine(decoder, max_batch_size=1)
    with torch.inference_mode():
        cached = cache_engine._prefill_cache(0, [PROMPTS[1]])[0]
    # two attention kernels (a mask over cache slots, or is_causal) through every layer: a stated 1000 fp32 eps
    tolerance = 1000 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(cached, full, rtol=tolerance, atol=tolerance * full.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_gives_the_eager_tokens_with_one_graph(decoder, dtype):
    from torch._dynamo.utils import counters

    model = decoder.to(dtype) if dtype != torch.float32 else decoder
    try:
        params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
        counters.clear()
        compiled = Engine(model, max_batch_size=4, compile=True)
        compiled.warm_up()
        assert compiled.compile_seconds > 0 and compiled._static_decode
        graphs = counters["stats"]["unique_graphs"]
        eager = Engine(model, max_batch_size=4)
        for prompts in (PROMPTS[:1], PROMPTS, PROMPTS[1:]):
            assert [c.token_ids for c in compiled.generate(prompts, params)] == \
                [c.token_ids for c in eager.generate(prompts, params)]
        assert counters["stats"]["unique_graphs"] == graphs  # every step replays the captured graph
        assert counters["inductor"].get("cudagraph_skips", 0) == 0  # the graph was captured, not skipped
    finally:
        decoder.float()


def test_a_compiled_training_step_equals_eager(tmp_path):
    eager = make_trainer(tmp_path / "eager", kernels="reference")
    compiled = make_trainer(tmp_path / "compiled", kernels="reference", compile=True)
    for _ in range(2):
        expected, got = eager.train_step(), compiled.train_step()
        # fp32 throughout; the compiled step sums in another order: a stated 100 fp32 eps
        assert float(got.loss) == pytest.approx(float(expected.loss), rel=100 * torch.finfo(torch.float32).eps)
        assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-4)
    torch.testing.assert_close(compiled.model.blocks[0].mlp.up.weight, eager.model.blocks[0].mlp.up.weight)


def test_lora_finetuning_on_cuda(tmp_path):
    from ling.checkpoint import save_model_dir
    from ling.data.synthetic import make_examples, write_jsonl
    from ling.lora import LoRAConfig
    from ling.train.finetune import run_finetune
    from tests.test_finetune import ALPHABET, _args

    tok = Tokenizer.train_char([ALPHABET])
    torch.manual_seed(0)
    save_model_dir(build_model(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, context_length=64)), tok,
                   tmp_path / "base")
    write_jsonl(make_examples("sort", 120), tmp_path / "sort.jsonl", "alpaca")
    args = _args(tmp_path / "base", tmp_path / "sort.jsonl", tmp_path / "run", method="lora",
                 lora=LoRAConfig(rank=4, alpha=8, dropout=0.0), train=dict(max_steps=12, eval_every=6, precision="bf16"))
    _, summary = run_finetune(dataclasses.replace(args, device=str(CUDA)), show_summary=False)
    assert summary["trainable_params"] < summary["total_params"] / 5
    assert summary["final_val_loss"] < summary["base_val_loss"]


@pytest.mark.parametrize("compile", [False, True])
def test_the_server_streams_on_cuda(tmp_path, compile):
    ckpt = make_checkpoint(tmp_path / "tiny-chat")
    args = ServeArgs(ckpt=str(ckpt), max_batch_size=4, device=str(CUDA), dtype="fp32", compile=compile)
    with live_server(args) as (url, state):
        body = {"prompt": "Speak", "max_tokens": 24, "temperature": 0}
        whole = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        pieces = []
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
        assert len(pieces) > 1 and "".join(pieces) == whole
        assert state.scheduler.engine.device.type == "cuda"


@pytest.mark.slow
def test_quickstart_on_cuda(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "ling", "quickstart", "--device", "cuda", "--minutes", "0.1",
                           "--out", str(out), "--sample-tokens", "40"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on cuda" in proc.stdout and "after training:" in proc.stdout
    lines = train_lines(out / "run")
    assert lines and all(r["max_memory_allocated"] > 0 for r in lines)


def test_memory_and_mfu_in_metrics_and_the_progress_line(tmp_path, capsys):
    name = torch.cuda.get_device_name()
    peak = metrics.gpu_peak_flops(name, "bf16")
    assert peak is not None, f"{name!r} is not in ling.train.metrics.GPU_PEAK_FLOPS: add its data-sheet peaks"
    torch.cuda.reset_peak_memory_stats()
    trainer = make_trainer(tmp_path, "bf16")
    assert trainer.peak == peak
    result = trainer.fit()
    lines = train_lines(tmp_path)
    assert len(lines) == 4
    for r in lines:
        assert 0 < r["max_memory_allocated"] <= torch.cuda.get_device_properties(0).total_memory
        assert 0 < r["mfu"] < 1
    assert 0 < result.mfu < 1
    err = capsys.readouterr().err
    assert " GiB" in err and "mem " in err and "MFU " in err
