"""Multi-process data parallel training on torch.distributed (launched by torchrun).

Each process trains on its own share of the global batch (see `TwoStreamBatches`); gradients are averaged by
PyTorch's DistributedDataParallel; rank 0 alone logs, validates and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_true(self, flag: torch.Tensor) -> bool:
        """Whether `flag` holds on every process (one collective; every process must call it)."""
        value = flag.to(torch.int32).reshape(1)
        if self.enabled:
            value = value.cpu() if dist.get_backend() == "gloo" else value
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def gather(self, obj: object) -> list[object]:
        """Every process's `obj`, in rank order (on every process)."""
        if not self.enabled:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_from_env(device_type: str) -> Dist:
    """Join the process group that torchrun describes in the environment; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local_rank)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
