"""Data-parallel training under `torchrun`: process group, DDP wrapping, small collectives.

With `WORLD_SIZE > 1` in the environment (torchrun sets it) every process trains on its own
share of each global batch. Under DDP (`--train.parallel ddp`, the default) each process
holds a whole replica and DDP averages the gradients; under FSDP (`--train.parallel fsdp`,
`ling.train.fsdp`) each holds a shard of the weights, gradients and optimizer state. NCCL on
CUDA, gloo on CPU. With one process and no FSDP all of this is a no-op, so the trainer has a
single code path.
"""

from __future__ import annotations

import os
import shlex
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ling.errors import LingError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"
    """none (one process), ddp (whole replicas) or fsdp (shards, also with one process)"""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    @property
    def is_main(self) -> bool:
        """Rank 0 does the I/O: logs, metrics, checkpoints, progress bar."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "MASTER_ADDR", "MASTER_PORT"} <= set(os.environ)


def torchrun_command() -> str:
    """This command as torchrun would start it (for the error when FSDP lacks a launcher)."""
    return "torchrun --nproc-per-node N -m ling " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def init_distributed(device_type: str, parallel: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment (or run alone).

    FSDP joins it even with one process: its checkpoints are sharded, and one process
    resuming them reads them through the same code as many."""
    if parallel == "fsdp" and not launched_by_torchrun():
        raise LingError(f"--train.parallel fsdp shards the model across processes started by torchrun: "
                        f"{torchrun_command()}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and parallel != "fsdp":
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as e:
            raise LingError(f"cannot join the torchrun process group ({e}); launch with torchrun --nproc-per-node N") from None
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank,
                parallel="fsdp" if parallel == "fsdp" else "ddp")


def shutdown(d: Dist) -> None:
    if d.parallel != "none" and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """DDP around the model when there are several processes (an FSDP model is sharded in
    place by `ling.train.fsdp.shard_model` and needs no wrapper)."""
    if not d.enabled or d.sharded:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def gradient_divisor(d: Dist) -> int:
    """What the gradient reduction divides the sum over processes by: DDP averages; FSDP is
    set to sum (`ling.train.fsdp`), on every backend alike."""
    return d.world_size if d.enabled and not d.sharded else 1


def accumulating(model: torch.nn.Module, d: Dist, last: bool):
    """The context of a micro-batch's backward pass: DDP skips its all-reduce until the last
    micro-batch; FSDP reduce-scatters every micro-batch into its sharded gradients (holding
    whole gradients until the last one would cost the memory it saves)."""
    return model.no_sync() if d.enabled and not d.sharded and not last else nullcontext()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if it is true on any (so that all ranks stop at the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: int, d: Dist, device: torch.device) -> int:
    if not d.enabled:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj, d: Dist) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj`, on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
