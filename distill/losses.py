"""MEAL V2 losses: soft cross-entropy on the ensemble's probabilities and the discriminator regulariser."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Batch mean of -sum_c p_c log softmax(z)_c (paper eq. 3, temperature 1)."""
    return -(target_probs * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


class Discriminator(nn.Module):
    """Three fully connected layers C → max(C//r, 8) → max(C//r², 8) → 2, ReLU after each (official code).

    ``head="linear"`` leaves out the last ReLU. With it, the two output logits are never negative,
    and once both sit at 0 for every input (a dead ReLU) the loss is exactly ln 2 and no gradient
    flows: the official form can be inert (docs/demo.md, "The discriminator").
    """

    def __init__(self, num_classes: int, reduction: int = 8, head: str = "relu"):
        super().__init__()
        if head not in ("relu", "linear"):
            raise ValueError(f"discriminator head {head!r}: expected relu or linear")
        hidden = max(num_classes // reduction, 8)
        narrow = max(num_classes // reduction ** 2, 8)
        self.layers = nn.Sequential(
            nn.Linear(num_classes, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, narrow), nn.ReLU(inplace=True),
            nn.Linear(narrow, 2), *([nn.ReLU(inplace=True)] if head == "relu" else []),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.float())


def discriminator_loss(discriminator: nn.Module, student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over concat(student, teacher) rows, targets [1, 0] and [0, 1], mean over 2B×2 entries.

    The student's output is not detached: minimising this total pulls both the
    discriminator and the student, as the official training code does.
    """
    logits = discriminator(torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=0))
    b = student_out.shape[0]
    targets = torch.zeros_like(logits)
    targets[:b, 0] = 1.0
    targets[b:, 1] = 1.0
    return F.binary_cross_entropy_with_logits(logits, targets)
