"""CutMix composites on the device: one slot's pairing (mix.SlotMix) applied to each decoded batch.

Each image is decoded once; a mixed image takes its box's region from its partner in the
same batch, and labels no teacher saw are blended by the pasted area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mealv2.pipeline.mix import SlotMix


class DeviceMix:
    """A slot's mixes with their partners and boxes copied to each device they meet once; ``batch`` gives a batch's."""

    def __init__(self, slot: SlotMix):
        self.slot = slot
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def batch(self, indices: torch.Tensor) -> "BatchMix":
        """The mixes of one decoded batch (dataset positions ``indices``, on the images' device)."""
        device = indices.device
        if device not in self._on_device:
            self._on_device[device] = (torch.from_numpy(self.slot.partner.astype(np.int64)).to(device),
                                       torch.from_numpy(self.slot.boxes.astype(np.int64)).to(device))
        partner, boxes = self._on_device[device]
        wanted = partner[indices]
        match = wanted[:, None] == indices[None, :]  # -1 never matches a position
        partner_at = torch.where(match.any(1), match.to(torch.int8).argmax(1), -1)
        return BatchMix(partner_at, torch.where((partner_at >= 0)[:, None], boxes[indices], 0), self.slot.res)


@dataclass
class BatchMix:
    """One batch's mixes: each image's partner's place in the batch (-1: unmixed) and its box at ``res``."""

    partner_at: torch.Tensor  # (B,) int64
    boxes: torch.Tensor       # (B, 4) int64
    res: int

    @property
    def mixed(self) -> torch.Tensor:
        """(B,) bool: the images whose pixels come partly from their partner."""
        return self.partner_at >= 0

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """The composites: each mixed image with its box's region taken from its partner's (uint8 NCHW at res)."""
        if tuple(images.shape[-2:]) != (self.res, self.res):
            raise ValueError(f"CutMix boxes are at {self.res} px, the batch is {tuple(images.shape[-2:])}")
        span = torch.arange(self.res, device=images.device)
        top, left, height, width = self.boxes.unbind(1)
        rows = (span >= top[:, None]) & (span < (top + height)[:, None])
        cols = (span >= left[:, None]) & (span < (left + width)[:, None])
        inside = rows[:, :, None] & cols[:, None, :] & self.mixed[:, None, None]
        return torch.where(inside[:, None], images[self.partner_at.clamp_min(0)], images)

    def pasted(self) -> torch.Tensor:
        """(B,) float32: the share of each image's pixels taken from its partner (0 where unmixed)."""
        return (self.boxes[:, 2] * self.boxes[:, 3]).float() / (self.res * self.res)

    def blend(self, targets: torch.Tensor) -> torch.Tensor:
        """Dense (B, C) targets mixed by area, as for labels no teacher computed on the composite (FKD's way)."""
        share = self.pasted().to(targets.dtype)[:, None]
        return (1 - share) * targets + share * targets[self.partner_at.clamp_min(0)]
