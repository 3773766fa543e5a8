"""A label store read from any training loop: a torch Dataset of replayed crops, and the GPU replay loader.

``ReplayDataset`` is the plain way (map-style, for torch's DataLoader and samplers);
``StoreLoader`` is the fast one that ``mealv2 distill`` itself uses (DALI on a GPU,
batches already on the device with their dense targets).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mealv2.distill.targets import CachedTargets
from mealv2.pipeline.distributed import as_device
from mealv2.pipeline.loader import ReplayLoader
from mealv2.pipeline.sampler import EpochSampler
from mealv2.pipeline.worker_replay import REPLAYS, replay_crop
from mealv2.softlabels.store import LabelStore, open_store


def _store_of(store: LabelStore | str) -> LabelStore:
    return store if isinstance(store, LabelStore) else open_store(store)


class ReplayDataset(Dataset):
    """Item i: (crop uint8 (3, res, res), dense target float32 (C,), row) of the store's i-th labelled image.

    The crop replays the box and flip of slot ``epoch`` mod S (``set_epoch``) from
    ROOT/train at the store's ``res`` and interpolation, by the store's crop contract; in a
    CutMix store it is the composite the teachers labelled (the partner is decoded too).
    Rows of images the store left out (``skipped``) are not items, so ``row`` equals ``i``
    unless some were. Normalisation is the caller's. The epoch lives in shared memory, so
    ``set_epoch`` reaches DataLoader workers, persistent ones included.
    """

    def __init__(self, root: str | os.PathLike, store: LabelStore | str, decoder: str = "torch"):
        if decoder not in REPLAYS:
            raise ValueError(f"decoder {decoder!r}: expected one of {sorted(REPLAYS)}")
        self.store = _store_of(store)
        self.index = self.store.matching_index(Path(root) / "train")
        self.rows = np.setdiff1d(np.arange(self.store.num_images), self.store.skipped_rows())
        self.res, self.interpolation, self.decoder = self.store.res, self.store.interpolation, decoder
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._reader_pid = os.getpid()

    def set_epoch(self, epoch: int) -> None:
        """Replay slot ``epoch`` mod S from now on, in this process and in every DataLoader worker."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.rows)

    def _reader(self) -> LabelStore:
        """The store, opened again in each worker process (an open bucket connection does not survive a fork)."""
        if self._reader_pid != os.getpid():
            self.store = self.store.reopened()
            self._reader_pid = os.getpid()
        return self.store

    def _crop(self, crops, row: int) -> np.ndarray:
        return replay_crop(self.index, row, crops.boxes[row], bool(crops.flips[row]), self.res, self.interpolation,
                           self.decoder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        row = int(self.rows[i])
        epoch = int(self._epoch)
        store = self._reader()
        crops = store.crops(epoch)
        image = self._crop(crops, row)
        if crops.mix_partner is not None and crops.mix_partner[row] >= 0:
            top, left, height, width = (int(v) for v in crops.mix_boxes[row])
            partner = self._crop(crops, int(crops.mix_partner[row]))
            image = np.require(image, requirements="W")  # PIL's arrays are read-only views
            image[:, top:top + height, left:left + width] = partner[:, top:top + height, left:left + width]
        return torch.from_numpy(image), store.targets(epoch, [row])[0], row

    def __setstate__(self, state: dict) -> None:
        """A worker's copy: the store came as its address and identity (LabelStore pickles so) and is open here."""
        state["_reader_pid"] = os.getpid()
        self.__dict__.update(state)


class StoreLoader:
    """The fast path for your own loop: ``epoch(e)`` yields (images uint8 (B, 3, res, res), targets float32 (B, C),
    rows int64 (B,)), all on ``device``.

    Decoded as ``mealv2 distill`` decodes (``decoder="auto"``: DALI on a GPU, with batches
    read and decoded ahead of the step), CutMix composites made on the device, shuffled by
    (seed, epoch) and split over ``world_size`` ranks with the same number of batches each.
    """

    def __init__(self, root: str | os.PathLike, store: LabelStore | str, batch_size: int,
                 device: torch.device | str = "cuda", decoder: str = "auto", workers: int | None = None,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.store = _store_of(store)
        self.device = as_device(device)
        self.sampler = EpochSampler(seed, shuffle, rank, world_size)
        if self.store.mix.enabled and batch_size % 2:
            raise ValueError(f"batch size {batch_size}: a CutMix store's batches hold whole pairs; use an even size")
        self.index = self.store.matching_index(Path(root) / "train")
        self.targets = CachedTargets(self.store, self.device)
        self.loader = ReplayLoader(self.index, self.store.res, batch_size, self.device, decoder,
                                   self.store.interpolation, workers)

    def close(self) -> None:
        """Shut the decoder's pipelines, processes and threads down now (``with StoreLoader(...) as loader:`` does)."""
        self.loader.close()

    def __enter__(self) -> StoreLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def epoch(self, epoch: int, progress: bool = True):
        """Epoch ``epoch``'s batches from slot ``epoch`` mod S, each image of this rank's share once."""
        plan = self.targets.plan(epoch)
        order = self.sampler.order(plan.trainable, epoch, plan.mix)
        for images, rows in self.loader.epoch(order, plan.boxes, plan.flips, desc=f"epoch {epoch}",
                                              progress=progress):
            images, targets = plan.batch(images, rows)
            yield images, targets.probs, rows
