"""torch.distributed as both stages use it: join the torchrun group, know this rank, sum and wait across ranks.

Without torchrun (no WORLD_SIZE in the environment, or 1) everything here is a no-op on a
world of one, so single-process code needs no branches.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (float64 on the CPU for gloo; returned on the input's device)."""
        if not self.distributed:
            return values
        total = values.detach().to("cpu", torch.float64) if dist.get_backend() == "gloo" else values.detach().clone()
        dist.all_reduce(total)
        return total.to(values.device, values.dtype)


def join(device_type: str) -> World:
    """Join the process group torchrun describes in the environment (NCCL for CUDA, gloo otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))  # a rank may label for long
    return world


def leave(world: World) -> None:
    """Leave the process group after a distributed run, so the interpreter exits cleanly."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
