"""A run stops at its first non-finite loss, before anything of that epoch is saved.

timm's train.py goes on and saves what follows: NaN weights as the last (and best) model. Here each step's loss
is looked at on the device (no wait per step); the host reads the record every CHECK_EVERY steps and once more
before the epoch is evaluated and saved, and stops the run with one line naming the step.
"""

from __future__ import annotations

import torch

from mealv2.pipeline.distributed import World

CHECK_EVERY = 20  # steps between the host's reads of the record (each waits for the device, and for every rank)


class NonFiniteLoss(RuntimeError):
    """A training step's loss was NaN or infinite: the message names the epoch, the step and what to check."""


class FiniteLoss:
    """The first step whose loss was not finite, recorded on the device; under torchrun every rank reads every
    rank's record (one all-reduce), so all ranks stop together and name the same step."""

    def __init__(self, world: World, device: torch.device):
        self.world = world
        self._first = torch.zeros((), dtype=torch.float64, device=device)  # 0: none yet
        self._loss = torch.zeros((), dtype=torch.float64, device=device)
        self._where = ""

    def step(self, loss: torch.Tensor, epoch: str, step: int) -> None:
        """After step ``step`` (counted from 1) of ``epoch`` (its "epoch E/N" label) with total loss ``loss``."""
        self._where = epoch  # the record is empty at each epoch's start: a check of the last one found nothing
        first = (self._first == 0) & ~torch.isfinite(loss.detach())
        self._first.masked_fill_(first, step)
        self._loss = torch.where(first, loss.detach().double(), self._loss)
        if step % CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        """Stop the run (NonFiniteLoss) if a step of this epoch had a non-finite loss on any rank."""
        mine = torch.zeros((self.world.world_size, 2), dtype=torch.float64, device=self._first.device)
        mine[self.world.rank] = torch.stack([self._first, self._loss])
        records = self.world.sum(mine).cpu()
        bad = [(int(step), rank, float(loss)) for rank, (step, loss) in enumerate(records.tolist()) if step]
        if bad:
            step, rank, loss = min(bad)
            where = f" on rank {rank}" if self.world.distributed else ""
            raise NonFiniteLoss(f"{self._where}, step {step}: the loss is {loss}{where}; nothing of this epoch was "
                                "saved: check the labels (mealv2 labels verify STORE --data ROOT), the learning "
                                "rate and the loss weights, or clip the gradients (--clip-grad)")
