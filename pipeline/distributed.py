"""torch.distributed as both stages use it: one call sets up this rank's device and the torchrun group.

Without torchrun (no WORLD_SIZE in the environment, or 1) the world has one rank and every
collective here is a no-op, so single-process code needs no branches. Under torchrun,
NCCL takes only tensors on this rank's GPU and gloo only CPU tensors: every collective
below moves its input to the backend's device itself, so callers may hand it any tensor.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from mealv2.pipeline.errors import first_line


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """"auto" → this process's CUDA device when there is one, else the CPU; "cuda" → cuda:LOCAL_RANK.

    Under torchrun each process on a machine takes the GPU of its local rank, so an explicit
    "cuda:N" (every rank on one GPU) is refused there; without torchrun it is taken as given.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if distributed and device.type == "cuda" and device.index is not None:
        raise ValueError(f"--device {name!r} under torchrun would put every rank on one GPU: pass --device cuda "
                         "(each rank takes the GPU of its local rank; CUDA_VISIBLE_DEVICES picks which GPUs)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def as_device(device: str | torch.device) -> torch.device:
    """``device`` with its index: a bare "cuda" is the calling thread's current GPU, the one torch's "cuda" tensors take.

    Normalised once where a device enters (a loader, a decoder, the teachers): torch.cuda.set_device,
    streams and per-thread bookkeeping need the index, and a thread started later has another current GPU.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def use_device(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device; nothing on the CPU.

    CUDA's current device is per host thread and a new thread starts on GPU 0, so a thread
    that touches CUDA (streams, events, pinned memory) calls this first: otherwise every rank
    opens a context on GPU 0 (about 0.5 GiB each; refused on GPUs in exclusive-process mode).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)


def default_workers() -> int:
    """Decoder threads for this process: the CPUs it may use, shared by the processes torchrun starts here."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place; returns it (one seam for tests that spy on collectives)."""
    dist.all_reduce(tensor)
    return tensor


def _all_gather(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor)
    return parts


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    dist.broadcast(tensor, src=0)
    return tensor


@dataclass(frozen=True)
class World:
    """This process's place among the ranks and its device (rank 0 of 1 on the CPU without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def collective_device(self) -> torch.device:
        """Where collectives take their tensors: this rank's GPU under NCCL, the CPU under gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, in float64 (exact counts); returned on the input's device and dtype."""
        if not self.distributed:
            return values
        total = _all_reduce(values.detach().to(self.collective_device, torch.float64))
        return total.to(values.device, values.dtype)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's ``data`` on every rank (other ranks pass None): a scanned index, say."""
        if not self.distributed:
            return data
        size = torch.tensor([len(data) if self.is_main else 0], dtype=torch.int64, device=self.collective_device)
        size = int(_broadcast(size).item())
        buffer = (_as_tensor(data).to(self.collective_device) if self.is_main
                  else torch.empty(size, dtype=torch.uint8, device=self.collective_device))
        return _broadcast(buffer).cpu().numpy().tobytes()

    def on_main(self, work: Callable[[], bytes | None]) -> bytes | None:
        """Run ``work`` on rank 0 alone and hand every rank its bytes; if it fails, every rank fails with its
        message (instead of the other ranks waiting for rank 0 until the group times out)."""
        if not self.distributed:
            return work()
        if not self.is_main:
            message = self.broadcast_bytes(None)
            if message[:1] == b"E":
                raise ValueError(f"{message[1:].decode()} (on rank 0)")
            return message[1:]
        try:
            result = work()
        except BaseException as err:
            self.broadcast_bytes(b"E" + first_line(err).encode())
            raise
        self.broadcast_bytes(b"R" + (result or b""))
        return result

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank (RNG states for a checkpoint, say)."""
        if not self.distributed:
            return [data]
        sizes = _all_gather(torch.tensor([len(data)], dtype=torch.int64, device=self.collective_device),
                            self.world_size)
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:len(data)] = _as_tensor(data)
        parts = _all_gather(padded.to(self.collective_device), self.world_size)
        return [part.cpu().numpy()[:int(size.item())].tobytes() for part, size in zip(parts, sizes)]


def setup(device: str = "auto") -> World:
    """This rank's world and device: join the group torchrun describes (NCCL on GPUs, gloo on the CPU).

    Call once per job, before building models or loaders: the job's GPU becomes this
    thread's current device (``--device cuda:1`` without torchrun too), so every later CUDA
    call of this thread lands on it; threads of its own call use_device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0
    resolved = resolve_device(device, local_rank, world_size > 1)
    use_device(resolved)
    if world_size <= 1:
        return World(device=resolved)
    world = World(int(os.environ["RANK"]), world_size, local_rank, resolved)
    if not dist.is_initialized():
        if resolved.type == "cuda":
            dist.init_process_group("nccl", timeout=datetime.timedelta(hours=2),  # a rank may label for long
                                    device_id=resolved)
        else:
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
    return world


def leave(world: World) -> None:
    """Leave the process group after a distributed run, so the interpreter exits cleanly."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
