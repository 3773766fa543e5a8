"""A run stops at its first non-finite loss, before anything of that epoch is saved.

timm's train.py goes on and saves what follows: NaN weights as the last (and best) model. Here each step's loss
is looked at on the device (no wait per step, and no wait added: the host reads this rank's record where the loop
waits for the device anyway, for a progress line or the bar's loss), and every rank's record once before the epoch
is evaluated and saved; the run stops with one line naming the first step.
"""

from __future__ import annotations

import torch

from mealv2.pipeline.distributed import World

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

    def check_here(self) -> None:
        """Stop the run if a step of this epoch had a non-finite loss on this rank (a rank that stops ends the
        others through torchrun); where the loop has just waited for the device."""
        first, loss = torch.stack([self._first, self._loss]).tolist()
        if first:
            self._stop([(int(first), self.world.rank, loss)])

    def check(self) -> None:
        """Stop the run (NonFiniteLoss) if a step of this epoch had a non-finite loss on any rank."""
        mine = torch.zeros((self.world.world_size, 2), dtype=torch.float64, device=self._first.device)
        mine[self.world.rank] = torch.stack([self._first, self._loss])
        records = self.world.sum(mine).cpu()
        bad = [(int(step), rank, float(loss)) for rank, (step, loss) in enumerate(records.tolist()) if step]
        if bad:
            self._stop(bad)

    def _stop(self, bad: list[tuple[int, int, float]]) -> None:
        """Raise NonFiniteLoss for the first of (step, rank, loss)."""
        step, rank, loss = min(bad)
        where = f" on rank {rank}" if self.world.distributed else ""
        raise NonFiniteLoss(f"{self._where}, step {step}: the loss is {loss}{where}; nothing of this epoch was "
                            "saved: check the labels (mealv2 labels verify STORE --data ROOT), the learning "
                            "rate and the loss weights, or clip the gradients (--clip-grad)")
