"""ling/kernels: each fast path computes what the reference model computes (value and
gradient), the choice between them is measured and cached, and commands report it."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ling.config import ModelConfig
from ling.errors import LingError
from ling.kernels import (
    Choice,
    KernelReport,
    Probe,
    apply_inference_kernels,
    apply_training_kernels,
    check_mode,
    plan_inference_kernels,
    plan_training_kernels,
)
from ling.kernels.cpu_attention import SingleQueryAttention, explicit_attention, single_query_attention
from ling.kernels.gelu import FusedGeluMLP, SigmoidGeluMLP, compiled_gelu_tanh
from ling.kernels.grad_ops import ATenGradEmbedding, BiasGradLinear
from ling.kernels.lean_block import LeanBlock, LeanRMSNorm
from ling.kernels.prepack import PrepackedLinear, can_prepack
from ling.kernels.probe import CACHE_FILE
from ling.kernels.swap import swap_class
from ling.model import MLP, Attention, Block, KVCache, RMSNorm, block_causal_mask, build_model

BF16 = dict(rtol=1.6e-2, atol=1e-2)
"""bf16 results against fp32 ones: torch.testing's bf16 tolerance (eps = 2^-8 → rtol 1.6e-2)"""

GPT2_LIKE = ModelConfig(vocab_size=61, context_length=32, n_layer=2, n_embd=32, n_head=4, bias="all")
LLAMA_GQA = ModelConfig(vocab_size=61, context_length=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp="swiglu",
                        mlp_hidden=48, norm="rmsnorm", position="rope", tie_embeddings=False)


def qkv(h_kv=4, T=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, h, T, 8, generator=g).to(dtype) for h in (4, h_kv, h_kv))


def sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])


def gradients(fn, inputs, weights):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad((out * weights).sum(), inputs)


# ---- attention --------------------------------------------------------------------------
@pytest.mark.parametrize("h_kv", [4, 2])
def test_explicit_causal_attention_matches_sdpa_in_value_and_gradient(h_kv):
    inputs = qkv(h_kv)
    weights = torch.randn(2, 4, 12, 8, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = gradients(sdpa, inputs, weights)
    got, got_grads = gradients(explicit_attention, inputs, weights)  # causal halves
    torch.testing.assert_close(got, expected)
    for name, g, e in zip("qkv", got_grads, expected_grads):
        torch.testing.assert_close(g, e, msg=f"gradient of {name}")


@pytest.mark.parametrize("rows", [2, 1])  # a mask per row, or one for the whole batch
def test_explicit_attention_with_a_block_causal_mask_matches_sdpa(rows):
    q, k, v = qkv()
    mask = block_causal_mask(torch.tensor([[0] * 5 + [1] * 7, [0] * 12]))[:rows]
    torch.testing.assert_close(explicit_attention(q, k, v, mask), sdpa(q, k, v, mask))


def test_explicit_attention_in_bf16_stays_within_bf16_of_fp32():
    q, k, v = qkv()
    got = explicit_attention(*(t.to(torch.bfloat16) for t in (q, k, v)))
    torch.testing.assert_close(got.float(), sdpa(q, k, v), **BF16)


@pytest.mark.parametrize("h_kv", [4, 2])
def test_single_query_attention_over_a_cache_matches_sdpa(h_kv):
    q, k, v = qkv(h_kv)
    q = q[:, :, -1:]
    mask = torch.tensor([[True] * 12, [True] * 7 + [False] * 5])[:, None, None]  # row 1 is 7 long
    torch.testing.assert_close(single_query_attention(q, k, v, mask), sdpa(q, k, v, mask))


# ---- the other training kernels -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gelu_equals_atens_tanh_gelu_in_value_and_gradient(dtype):
    x = torch.linspace(-6, 6, 1001, dtype=dtype)
    weights = torch.linspace(-1, 1, 1001, dtype=dtype)
    expected, (expected_grad,) = gradients(lambda t: F.gelu(t, approximate="tanh"), [x], weights)
    got, (got_grad,) = gradients(compiled_gelu_tanh(), [x], weights)  # one loop in fp32, rounded once
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


@pytest.mark.parametrize("kernel", [FusedGeluMLP, SigmoidGeluMLP])
def test_gelu_mlps_compute_the_reference_mlp(kernel):
    torch.manual_seed(0)
    reference = MLP(GPT2_LIKE)
    fast = MLP(GPT2_LIKE)
    fast.load_state_dict(reference.state_dict())
    swap_class(fast, MLP, kernel)
    x = torch.randn(2, 5, 32)
    weights = torch.randn(2, 5, 32)
    for module in (reference, fast):
        (module(x) * weights).sum().backward()
    torch.testing.assert_close(fast(x), reference(x))
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    with torch.no_grad():  # inference: FusedGeluMLP keeps ATen's kernel, bit for bit
        if kernel is FusedGeluMLP:
            assert torch.equal(fast(x), reference(x))


def test_compiled_embedding_gives_atens_gradient_for_repeated_ids():
    """Inside a compiled training step the embedding's gradient is ATen's kernel (the
    `ling::embedding_weight_grad` op); it sums the gradient of every use of a row."""
    torch.manual_seed(0)
    table = nn.Embedding(5, 3)
    swap_class(table, nn.Embedding, ATenGradEmbedding)
    ids = torch.tensor([[0, 1, 1, 4], [4, 4, 0, 2]])
    weights = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))

    def loss(ids):
        return (table(ids) * weights).sum()

    loss(ids).backward()
    eager = table.weight.grad.clone()
    table.weight.grad = None
    torch.compile(loss, fullgraph=True)(ids).backward()
    torch.testing.assert_close(table.weight.grad, eager)
    expected = torch.zeros(5, 3).index_add_(0, ids.flatten(), weights.flatten(0, 1))
    torch.testing.assert_close(eager, expected)
    assert eager[3].abs().sum() == 0  # an unused row gets no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_bias_grad_linear_gives_nn_linears_value_and_gradient(dtype):
    torch.manual_seed(0)
    reference = nn.Linear(4, 3).to(dtype)
    layer = nn.Linear(4, 3).to(dtype)
    layer.load_state_dict(reference.state_dict())
    swap_class(layer, nn.Linear, BiasGradLinear)
    x = torch.randn(2, 5, 4, dtype=dtype)
    weights = torch.randn(2, 5, 3, dtype=dtype)
    expected = (reference(x) * weights).sum()
    expected.backward()
    got = torch.compile(lambda x: (layer(x) * weights).sum(), fullgraph=True)(x)
    got.backward()
    torch.testing.assert_close(got, expected)
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    layer.bias.requires_grad_(False)  # a frozen bias gets no gradient
    layer.bias.grad = layer.weight.grad = None
    torch.compile(lambda x: (layer(x) * weights).sum(), fullgraph=True)(x).backward()
    assert layer.bias.grad is None and layer.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linear_computes_f_linear(dtype):
    if not can_prepack("cpu", dtype):
        pytest.skip(f"oneDNN cannot prepack {dtype} on this CPU")  # bf16 needs native bf16 support
    torch.manual_seed(0)
    linear = nn.Linear(48, 40).to(dtype)
    packed = PrepackedLinear(linear)
    for rows in (1, 5):
        x = torch.randn(rows, 1, 48, dtype=dtype)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), linear(x))


QWEN3_LIKE = ModelConfig(vocab_size=61, context_length=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=1, head_dim=16,
                         mlp="swiglu", mlp_hidden=48, norm="rmsnorm", position="rope", qk_norm=True, bias="qkv")


@pytest.mark.parametrize("cfg", [GPT2_LIKE, LLAMA_GQA, QWEN3_LIKE], ids=["gpt2", "llama-gqa", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False], ids=["prepacked", "aten"])
def test_the_lean_block_computes_the_reference_block_prefilling_and_decoding(cfg, dtype, packed):
    if packed and not can_prepack("cpu", dtype):
        pytest.skip(f"oneDNN cannot prepack {dtype} on this CPU")
    torch.manual_seed(0)
    reference = build_model(cfg).to(dtype).eval()
    lean = build_model(cfg).to(dtype).eval()
    lean.load_state_dict(reference.state_dict())
    if packed:
        from ling.kernels.swap import replace_modules
        replace_modules(lean, lambda m: type(m) is nn.Linear, PrepackedLinear)
    swap_class(lean, Block, LeanBlock)
    swap_class(lean, RMSNorm, LeanRMSNorm)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    tolerance = {} if dtype == torch.float32 else BF16
    with torch.inference_mode():
        torch.testing.assert_close(lean(tokens), reference(tokens), **tolerance)  # no cache: causal
        caches = [KVCache(cfg, 2, 16, dtype=dtype) for _ in range(2)]
        positions = torch.arange(8).expand(2, 8)
        for model, cache in zip((reference, lean), caches):
            model(tokens[:, :8], positions, cache=cache)  # prefill
        step = [model(tokens[:, 8:], torch.tensor([[8], [8]]), cache=cache) for model, cache in zip((reference, lean), caches)]
    torch.testing.assert_close(step[1], step[0], **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rms_norm_is_rms_norm(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    lean = RMSNorm(48, 1e-5)
    lean.load_state_dict(norm.state_dict())
    swap_class(lean, RMSNorm, LeanRMSNorm)
    x = (torch.randn(3, 5, 48) * 4).to(dtype)
    tolerance = {} if dtype == torch.float32 else BF16
    torch.testing.assert_close(lean.to(dtype)(x), norm.to(dtype)(x), **tolerance)
    assert list(lean.state_dict()) == ["weight"]  # the doubled weight is not state


# ---- whole models --------------------------------------------------------------------
def report_with(**picks) -> KernelReport:
    return KernelReport("auto", [Choice(part, picked, "rule") for part, picked in picks.items()])


TRAINING_PICKS = {
    "explicit attention, fused gelu": {"attention (training)": "explicit", "gelu (training)": "fused"},
    "compiled-step kernels": {"attention (training)": "explicit", "gelu (training)": "sigmoid form",
                              "gradients (compiled)": "ATen ops"},
}


@pytest.mark.parametrize("cfg", [GPT2_LIKE, LLAMA_GQA], ids=["gpt2", "llama-gqa"])
@pytest.mark.parametrize("picks", list(TRAINING_PICKS), ids=list(TRAINING_PICKS))
def test_training_kernels_give_the_reference_models_logits_and_gradients(cfg, picks):
    torch.manual_seed(0)
    reference = build_model(cfg)
    fast = build_model(cfg)
    fast.load_state_dict(reference.state_dict())
    apply_training_kernels(fast, report_with(**TRAINING_PICKS[picks]), torch.device("cpu"))
    assert list(fast.state_dict()) == list(reference.state_dict())  # same names: checkpoints unchanged
    assert any(type(m) is not type(r) for m, r in zip(fast.modules(), reference.modules()))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    for model in (reference, fast):
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    torch.testing.assert_close(fast(tokens), reference(tokens))
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_reference_mode_plans_nothing_and_auto_decides_every_cpu_part():
    cpu = torch.device("cpu")
    kwargs = dict(device=cpu, precision="bf16", micro_batch=4, seq_len=16)
    assert plan_training_kernels(GPT2_LIKE, mode="reference", compile=False, **kwargs).choices == []
    eager = plan_training_kernels(GPT2_LIKE, mode="auto", compile=False, **kwargs)
    assert [c.part for c in eager.choices] == ["attention (training)", "gelu (training)"]
    assert eager.picked("attention (training)") in ("sdpa", "explicit") and eager.picked("gelu (training)") in ("aten", "fused")
    compiled = plan_training_kernels(LLAMA_GQA, mode="auto", compile=True, **kwargs)
    assert [c.part for c in compiled.choices] == ["attention (training)", "gradients (compiled)"]  # no GELU in SwiGLU
    model = build_model(GPT2_LIKE)
    types = [type(m) for m in model.modules()]
    apply_training_kernels(model, KernelReport("reference"), cpu)
    assert [type(m) for m in model.modules()] == types


@pytest.mark.parametrize("cfg", [GPT2_LIKE, LLAMA_GQA], ids=["gpt2", "llama-gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_inference_kernel_decodes_the_reference_models_greedy_tokens(cfg, dtype):
    from ling.infer import Engine, SamplingParams

    if not can_prepack("cpu", dtype):
        pytest.skip(f"oneDNN cannot prepack {dtype} on this CPU")
    torch.manual_seed(0)
    reference = build_model(cfg).to(dtype).eval()
    fast = build_model(cfg).to(dtype).eval()
    fast.load_state_dict(reference.state_dict())
    picks = {"decode attention": "matmuls, float32 cache", "layer": "lean"}
    picks.update({c.part: "prepacked" for c in plan_inference_kernels(fast, mode="auto", max_batch_size=2, max_len=32).choices
                  if c.part.startswith("linear")})
    cache_dtype = apply_inference_kernels(fast, report_with(**picks))
    assert cache_dtype == torch.float32
    assert any(isinstance(m, PrepackedLinear) for m in fast.modules())
    assert all(type(m) is SingleQueryAttention for m in fast.modules() if isinstance(m, Attention))
    assert all(type(m) is LeanBlock for m in fast.blocks)
    prompts = [[5, 9, 2], list(range(1, 20))]
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    with torch.inference_mode():
        expected = Engine(reference, max_batch_size=2).generate(prompts, params)
        got = Engine(fast, max_batch_size=2).generate(prompts, params)
        tokens = torch.tensor([prompts[1]])
        logits, fast_logits = reference(tokens), fast(tokens)
    tolerance = {} if dtype == torch.float32 else BF16
    torch.testing.assert_close(fast_logits, logits, **tolerance)
    if dtype == torch.float32:  # in bf16 a near-tie may round either way
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]


def test_an_engine_reports_its_kernels_and_reference_mode_keeps_the_plain_model(tmp_path):
    from ling.checkpoint import save_model_dir
    from ling.infer import Engine, SamplingParams

    torch.manual_seed(0)
    save_model_dir(build_model(LLAMA_GQA), None, tmp_path / "ckpt")
    auto = Engine(tmp_path / "ckpt", max_batch_size=2)
    plain = Engine(tmp_path / "ckpt", max_batch_size=2, kernels="reference")
    assert auto.kernels.mode == "auto" and auto.kernels.picked("decode attention") is not None
    assert auto.kernels.summary().startswith("kernels: ")
    assert plain.kernels.choices == [] and plain.kernels.summary() == "kernels: reference (the plain model)"
    assert plain.cache.dtype == torch.float32 and all(type(m) in (nn.Linear,) for m in plain.model.modules()
                                                      if isinstance(m, (nn.Linear, PrepackedLinear)))
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    assert [c.token_ids for c in auto.generate([[3, 4, 5]], params)] == \
        [c.token_ids for c in plain.generate([[3, 4, 5]], params)]


# ---- the choice: measured, cached, reported ----------------------------------------------------
def test_the_probe_keeps_the_fastest_candidate_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LING_CACHE", str(tmp_path))
    big = torch.randn(384, 384)
    calls = []

    def slow():
        calls.append("slow")
        for _ in range(20):
            big @ big

    def broken():
        raise RuntimeError("not on this machine")

    candidates = {"slow": slow, "fast": lambda: calls.append("fast"), "broken": broken}
    choice = Probe(torch.device("cpu"), seconds=0.05).pick("part", "shape", candidates)
    assert (choice.picked, choice.how) == ("fast", "measured")
    assert set(choice.seconds) == {"slow", "fast"}  # a candidate that fails is out of the race
    assert choice.speedup == pytest.approx(choice.seconds["slow"] / choice.seconds["fast"])
    calls.clear()
    again = Probe(torch.device("cpu")).pick("part", "shape", candidates)  # another process, same machine
    assert (again.picked, again.how, calls) == ("fast", "cached", [])
    other_shape = Probe(torch.device("cpu"), seconds=0.01).pick("part", "other shape", candidates)
    assert other_shape.how == "measured"
    stored = json.loads((tmp_path / CACHE_FILE).read_text())
    assert len(stored) == 2 and all(torch.__version__ in key for key in stored)


def test_a_corrupt_cache_is_measured_again_with_a_one_line_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LING_CACHE", str(tmp_path))
    (tmp_path / CACHE_FILE).write_bytes(b"\x00\xffnot json")
    choice = Probe(torch.device("cpu"), seconds=0.01).pick("part", "shape", {"a": lambda: None})
    assert (choice.picked, choice.how) == ("a", "measured")
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "measuring the kernels again" in warning[0]
    assert json.loads((tmp_path / CACHE_FILE).read_text())  # rewritten whole


def test_a_report_summarises_each_part_and_groups_the_linears():
    report = KernelReport("auto", [
        Choice("attention (training)", "explicit", "measured", {"sdpa": 2.0, "explicit": 1.0}),
        Choice("linear 8x8", "prepacked", "cached", {"aten": 3.0, "prepacked": 1.0}),
        Choice("linear 8x16", "prepacked", "measured", {"aten": 1.5, "prepacked": 1.0}),
        Choice("linear 16x8", "aten", "measured", {"aten": 1.0, "prepacked": 1.2}),
        Choice("gradients (compiled)", "ATen ops", "rule"),
    ])
    assert report.summary() == ("kernels: attention (training): explicit (2.00×) · gradients (compiled): ATen ops (rule)"
                                " · linear: prepacked for 2 of 3 shapes (1.50–3.00×) · linear: aten for 1 of 3 shapes (1.00×)")
    assert report.to_dict()["choices"][0] == {"part": "attention (training)", "picked": "explicit", "how": "measured",
                                              "seconds": {"sdpa": 2.0, "explicit": 1.0}, "note": ""}


def test_an_unknown_kernels_mode_names_the_closest():
    assert check_mode("auto") == "auto"
    with pytest.raises(LingError, match="unknown --kernels 'refrence'; did you mean 'reference'"):
        check_mode("refrence")


def test_a_choice_measured_on_a_busy_machine_is_measured_again_once_it_is_quieter(tmp_path, monkeypatch):
    from ling.kernels import probe

    monkeypatch.setenv("LING_CACHE", str(tmp_path))
    load = iter([3.0, 2.0, 0.5, 0.5])  # per core: busy when measured, still busy, then quiet
    monkeypatch.setattr(probe, "load_per_core", lambda: next(load))
    pick = lambda: Probe(torch.device("cpu"), seconds=0.01).pick("part", "shape", {"a": lambda: None}).how  # noqa: E731
    assert [pick(), pick(), pick()] == ["measured", "cached", "measured"]


def test_compiling_the_decode_step_is_chosen_only_where_the_measured_saving_beats_the_compile_time(tmp_path, monkeypatch):
    from ling.kernels import compile_decision

    monkeypatch.setenv("LING_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    key = compile_decision.shape_key(LLAMA_GQA, torch.bfloat16, 1)
    compile, why = compile_decision.decide(cpu, key, 100)
    assert compile and "no earlier measurement" in why  # nothing known: compile, and learn
    compile_decision.remember(cpu, key, eager_step=0.030)
    compile_decision.remember(cpu, key, compiled_step=0.020, compile=20.0)  # 10 ms saved a step, 20 s to compile
    assert compile_decision.decide(cpu, key, 256) == (
        False, "not compiling: it took ~20 s here and would save ~3 s over ~256 steps (measured earlier on this machine)")
    assert compile_decision.decide(cpu, key, 4000) == (True, "compiling: ~20 s to compile, saves ~40 s over ~4000 steps")
    other = compile_decision.shape_key(LLAMA_GQA, torch.bfloat16, 8)
    assert compile_decision.decide(cpu, other, 4000)[0] and "no earlier" in compile_decision.decide(cpu, other, 1)[1]


def test_an_engine_records_its_decode_step_time_for_that_decision(tmp_path, monkeypatch):
    from ling.checkpoint import save_model_dir
    from ling.infer import Engine, SamplingParams
    from ling.kernels import compile_decision
    from ling.kernels.probe import Probe

    monkeypatch.setenv("LING_CACHE", str(tmp_path / "cache"))
    save_model_dir(build_model(LLAMA_GQA), None, tmp_path / "ckpt")
    engine = Engine(tmp_path / "ckpt", max_batch_size=1)
    engine.generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    engine.record_speed()
    key = compile_decision.shape_key(LLAMA_GQA, torch.float32, 1)
    known = Probe(torch.device("cpu")).recall(compile_decision.PART, key)
    assert set(known) == {"eager_step"} and 0 < known["eager_step"] < 10
    live = Engine(build_model(LLAMA_GQA), max_batch_size=1)  # a live model: not the tuned engine's speed
    live.generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    live.record_speed()
    assert Probe(torch.device("cpu")).recall(compile_decision.PART, key) == known
