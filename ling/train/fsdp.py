"""Sharded data parallel (FSDP2): each of N processes holds 1/N of the model's training state.

Under DDP every process holds the whole model, its gradients and the optimizer's state (for
AdamW, two more copies of the weights). `shard_model` applies `torch.distributed.fsdp.fully_shard`
from outside the plain model, as torchtitan does: once per transformer block, once for the
embeddings and the LM head together (a tied head *is* the embedding: one tensor, one group),
then at the root (the final norm, a task head, LoRA's trainable token rows). Each parameter
becomes a DTensor holding this process's rows; a block's weights are all-gathered just
before its forward pass and freed after it (`reshard_after_forward`, gathered again for the
backward pass), and its gradients are reduce-scattered so each process keeps only its rows.
The optimizer, built afterwards, steps on the shards.

Gradient reduction: ling's loss is the mean over every counted position of all processes,
so each process's backward already carries 1 / (global count). The reduction must then sum,
on every backend — FSDP's default divides by the world size (NCCL's AVG), while on gloo it
sums (pytorch#162338). `shard_model` sets the divide factor to 1 and forces sum reductions,
so the reduction means the same on CPU and GPU and the trainer scales the loss once.

Checkpoints: the training state (sharded weights and optimizer state) is written with
`torch.distributed.checkpoint` — each process its own file — and read back on any number of
processes (DCP reshards). The weights are also gathered (`full_state_dict`, onto the CPU of
rank 0) into a `plain_copy` of the model, which the usual save hooks write as a normal
checkpoint directory.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ling.model import Transformer

SHARDS = "train_state.dcp"
"""the DCP directory of a sharded checkpoint, beside train_state.pt"""


def shard_model(model: nn.Module, precision: str, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place over the default process group (blocks, embeddings + head, root)."""
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
          else MixedPrecisionPolicy())
    for body in [m for m in model.modules() if isinstance(m, Transformer)]:
        for block in body.blocks:
            fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        ends = [body.embed, body.lm_head] + ([body.pos_embed] if hasattr(body, "pos_embed") else [])
        fully_shard(ends, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of the (not yet sharded) model whose parameters are on the meta device (no
    memory; ties kept): what `plain_copy` fills with gathered weights."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def plain_copy(model: nn.Module, skeleton: nn.Module | None) -> nn.Module | None:
    """Gather the sharded `model`'s whole weights (a collective: every process calls it) into a
    copy of `skeleton` on the CPU of rank 0, which gets it; other processes get None."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if skeleton is None:
        return None
    plain = copy.deepcopy(skeleton)
    plain.load_state_dict(full, assign=True)
    return plain


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every process writes its shard of the weights and optimizer state into `directory`."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                 weights: bool = True) -> None:
    """Read a sharded checkpoint into `model` and `optimizer`, on any number of processes
    (DCP reshards); `weights=False` reads only the optimizer state (the weights came from
    the checkpoint's safetensors, e.g. into a model that is not sharded)."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    if weights:
        state["model"] = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=str(directory))
    if weights:
        set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
