"""Which kernels the inference engine uses: decided when it loads a model it owns.

On CPU, timed on the model's own shapes (`Probe`):
- each weight shape's linear layer: ATen's `F.linear` or oneDNN-prepacked weights
  (`prepack`), at one row and at the engine's batch size;
- the decode step's attention: SDPA or `single_query_attention`, together with the KV
  cache's dtype for a bf16 model (fp32 or bf16: CPU attention kernels differ a lot between
  the two for one query per row);
- the layer: `Block` or `LeanBlock` (the same computation in fewer operations, with the
  linear layers' epilogues fused), timed as one layer's decode step with the picks above.
A compiled engine (`compile=True`) leaves the linears to inductor's frozen weights (it
prepacks them itself) and writes decode attention as matmuls for inductor to fuse.
`mode="reference"`: the plain model, with a cache in the model's dtype.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ling.kernels.cpu_attention import SingleQueryAttention, single_query_attention
from ling.kernels.lean_block import LeanBlock, LeanRMSNorm
from ling.kernels.prepack import PrepackedLinear, can_prepack
from ling.kernels.probe import Probe
from ling.kernels.report import Choice, KernelReport, check_mode
from ling.kernels.swap import replace_modules, swap_class
from ling.model import Attention, Block, KVCache, RMSNorm, Transformer, build_model

PROBE_CONTEXT = 256
"""cache slots in use when the decode attention is timed (a typical mid-generation length)"""
LINEAR, DECODE_ATTENTION, LAYER = "linear", "decode attention", "layer"


def plan_inference_kernels(model: Transformer, *, mode: str, max_batch_size: int, max_len: int, compile: bool = False,
                           probe: Probe | None = None) -> KernelReport:
    """Decide, timing the candidates on `model`'s shapes; the model is not changed."""
    report = KernelReport(check_mode(mode))
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if mode == "reference" or device.type != "cpu":
        return report
    if compile:
        report.add(Choice(DECODE_ATTENTION, "matmuls, float32 cache", "rule"))
        return report
    probe = probe or Probe(device)
    if can_prepack(device, dtype):
        for shape, example in _linear_shapes(model).items():
            report.add(_time_linear(shape, example, probe, max_batch_size))
    slots = min(max_len, PROBE_CONTEXT)
    report.add(_time_decode_attention(model.cfg, dtype, probe, max_batch_size, slots))
    report.add(_time_layer(model.cfg, dtype, report, probe, max_batch_size, slots))
    return report


def apply_inference_kernels(model: Transformer, report: KernelReport) -> torch.dtype:
    """Swap the kernels `report` picked into `model` (which the caller owns: prepacked weights
    stop being parameters); returns the KV cache dtype to decode with."""
    packed = {c.part for c in report.choices if c.part.startswith(LINEAR) and c.picked == "prepacked"}
    replace_modules(model, lambda m: type(m) is nn.Linear and _linear_part(_shape(m)) in packed, PrepackedLinear)
    attention = report.picked(DECODE_ATTENTION)
    if attention is not None and attention.startswith("matmuls"):
        swap_class(model, Attention, SingleQueryAttention)
    if report.picked(LAYER) == "lean":
        swap_class(model, Block, LeanBlock)
        swap_class(model, RMSNorm, LeanRMSNorm)
    if attention is not None and attention.endswith("float32 cache"):
        return torch.float32
    return next(model.parameters()).dtype


def _shape(linear: nn.Linear) -> tuple[int, int, bool]:
    return linear.in_features, linear.out_features, linear.bias is not None


def _linear_part(shape: tuple[int, int, bool]) -> str:
    n_in, n_out, bias = shape
    return f"{LINEAR} {n_in}x{n_out}" + (" +bias" if bias else "")


def _linear_shapes(model: nn.Module) -> dict[tuple[int, int, bool], nn.Linear]:
    shapes = {}
    for module in model.modules():
        if type(module) is nn.Linear:
            shapes.setdefault(_shape(module), module)
    return shapes


def _time_linear(shape, example: nn.Linear, probe: Probe, batch: int) -> Choice:
    """ATen's linear vs prepacked weights, at one row and at `batch` rows."""
    weight, bias = example.weight.detach(), None if example.bias is None else example.bias.detach()
    packed = PrepackedLinear(example)
    rows = sorted({1, batch})
    inputs = [torch.randn(n, 1, shape[0], dtype=weight.dtype) for n in rows]
    candidates = {"aten": lambda: [F.linear(x, weight, bias) for x in inputs], "prepacked": lambda: [packed(x) for x in inputs]}
    with torch.inference_mode():
        return probe.pick(_linear_part(shape), f"rows={rows}|{weight.dtype}", candidates)


def _time_decode_attention(model_cfg, dtype: torch.dtype, probe: Probe, batch: int, slots: int) -> Choice:
    """One layer's decode step of attention (cache write + attention), for each cache dtype
    and each attention."""
    cfg = copy.copy(model_cfg)
    cfg.n_layer = 1
    cache_dtypes = [dtype] + ([torch.float32] if dtype != torch.float32 else [])  # the reference first
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, cfg.n_head, 1, cfg.head_dim, generator=g)
    kv = torch.randn(batch, cfg.n_kv_head, 1, cfg.head_dim, generator=g)
    positions = torch.full((batch, 1), slots - 1)
    mask = (torch.arange(slots)[None, None, :] <= positions[:, :, None])[:, None]
    gqa = cfg.n_head != cfg.n_kv_head

    def sdpa(q, k, v, mask, dropout):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def step(cache: KVCache, attend):
        def run():
            k, v = cache.write(0, kv.to(dtype), kv.to(dtype), positions)
            return attend(q.to(dtype).to(cache.dtype), k, v, mask, 0.0)
        return run

    candidates = {}
    for cache_dtype in cache_dtypes:
        cache = KVCache(cfg, batch, slots, dtype=cache_dtype)
        name = str(cache_dtype).removeprefix("torch.")
        candidates[f"sdpa, {name} cache"] = step(cache, sdpa)
        candidates[f"matmuls, {name} cache"] = step(cache, lambda q, k, v, m, d: single_query_attention(q, k, v, m))
    with torch.inference_mode():
        return probe.pick(DECODE_ATTENTION, f"B={batch},S={slots},H={cfg.n_head},Hkv={cfg.n_kv_head},"
                                            f"D={cfg.head_dim}|{dtype}", candidates)


def _time_layer(model_cfg, dtype: torch.dtype, picks: KernelReport, probe: Probe, batch: int, slots: int) -> Choice:
    """One layer's decode step (random weights of the model's shape, the kernels picked so
    far), as `Block` and as `LeanBlock`."""
    cfg = copy.copy(model_cfg)
    cfg.n_layer = 1
    layers = {}
    for name in ("reference", "lean"):
        torch.manual_seed(0)
        model = build_model(cfg, dtype=dtype).eval()
        cache = KVCache(cfg, batch, slots, dtype=apply_inference_kernels(model, picks))
        if name == "lean":
            swap_class(model, Block, LeanBlock)
            swap_class(model, RMSNorm, LeanRMSNorm)
        layers[name] = (model.blocks[0], cache, model)
    positions = torch.full((batch, 1), slots - 1)
    mask = (torch.arange(slots)[None, None, :] <= positions[:, :, None])[:, None]
    x = torch.randn(batch, 1, cfg.n_embd, generator=torch.Generator().manual_seed(0)).to(dtype)
    model = layers["reference"][2]
    rope = None if cfg.position != "rope" else (model.rope_cos[positions][:, :, None], model.rope_sin[positions][:, :, None])
    candidates = {name: (lambda block=block, cache=cache: block(x, rope, positions, mask, cache, 0))
                  for name, (block, cache, _) in layers.items()}
    with torch.inference_mode():
        return probe.pick(LAYER, f"{cfg.n_embd},{cfg.n_head},{cfg.n_kv_head},{cfg.head_dim},{cfg.mlp}:{cfg.mlp_hidden},"
                                 f"{cfg.norm},{cfg.bias},qk_norm={cfg.qk_norm}|B={batch},S={slots}|{dtype}|"
                                 + ",".join(f"{c.part}={c.picked}" for c in picks.choices), candidates)
