"""Distributed runs under torchrun: the process group and the few collectives training needs.

With WORLD_SIZE > 1 each process joins the group (nccl on CUDA, gloo on CPU) and `Dist` holds
its rank; otherwise `Dist()` is a world of one whose collectives return their input, so the
training loop has no single-process branches. Collectives are per epoch, never per step: ranks
run equal step counts by construction (`training.data.stream`), and only the epoch's sums and
validation predictions travel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine (they share its CPUs)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.active:
            dist.all_reduce(t)
        return t.tolist()

    def spread(self, value: float, device: torch.device) -> tuple[float, float]:
        """(min, max) of `value` over ranks."""
        t = torch.tensor([value, -value], dtype=torch.float64, device=device)
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        most, neg_least = t.tolist()
        return -neg_least, most

    def gather_arrays(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """Concatenate per-rank arrays (any lengths) on every rank."""
        if not self.active:
            return arrays
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, arrays)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model in DistributedDataParallel when the world is larger than one."""
        if not self.active:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(cuda: bool) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(
        dist.get_rank(),
        dist.get_world_size(),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", world)),
    )
