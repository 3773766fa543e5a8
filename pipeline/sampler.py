"""The traversal order of training epochs, apart from the loader that replays it (as FFCV separates the two).

Which positions this rank visits in epoch e, and in what order, is a function of (seed,
epoch, rank, world size) alone, so a resumed or rescaled run visits the same images in the
same order; the loader only replays the order it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mealv2.pipeline.mix import SlotMix


@dataclass(frozen=True)
class EpochSampler:
    """This rank's dataset positions per epoch: shuffled by (seed, epoch) when asked, split across ranks round-robin.

    With more than one rank the order is padded by wrapping so every rank gets the same count
    (and thus the same number of steps); with one rank every image comes exactly once.
    """

    seed: int = 0
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    def order(self, images: int | np.ndarray, epoch: int, mix: SlotMix | None = None) -> np.ndarray:
        """Epoch ``epoch``'s positions of ``images`` (a count, or the positions to train on) for this rank.

        With ``mix`` the images go two by two (each CutMix pair whole, SlotMix.groups), so that
        batches of an even size hold whole pairs; a last image without a companion comes last.
        """
        order = np.arange(images, dtype=np.int64) if np.ndim(images) == 0 else np.asarray(images, np.int64)
        units = order[:, None] if mix is None else mix.groups(order)  # rows of images that stay together
        if self.shuffle:
            units = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(units)
        per_rank = -(-len(units) // self.world_size)
        if per_rank * self.world_size > len(units):
            units = np.resize(units, (per_rank * self.world_size, units.shape[1]))  # wraps, like DistributedSampler
        mine = units[self.rank::self.world_size]
        mine = mine[np.argsort((mine < 0).any(axis=1), kind="stable")]  # the companionless row last
        return mine[mine >= 0]
