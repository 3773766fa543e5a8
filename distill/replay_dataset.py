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
from mealv2.pipeline.worker_replay import REPLAYS, freeze_inherited_objects, replay_crop
from mealv2.softlabels.store import LabelStore, open_store
from mealv2.softlabels.topk import expand


def _store_of(store: LabelStore | str) -> LabelStore:
    return store if isinstance(store, LabelStore) else open_store(store)


TARGET_FORMS = ("dense", "topk")


class ReplayDataset(Dataset):
    """Item i: (crop uint8 (3, res, res), dense target float32 (C,), row) of the store's i-th labelled image.

    The crop replays the box and flip of slot ``epoch`` mod S (``set_epoch``) from
    ROOT/train at the store's ``res`` and interpolation, by the store's crop contract; in a
    CutMix store it is the composite the teachers labelled (the partner is decoded too).
    Rows of images the store left out (``skipped``) are not items, so ``row`` equals ``i``
    unless some were. Normalisation is the caller's. ``targets="topk"`` hands the stored
    top-k instead, (values float16 (k,), classes int64 (k,)), for the device to expand.

    The process that makes the dataset reads the slot, once per slot change, into shared
    memory; DataLoader workers (forked or spawned, persistent or not) read their rows from
    it, so a worker holds no slot of its own and ``set_epoch`` reaches persistent ones. At
    its first item a worker freezes the objects it holds then (``gc.freeze``): collections
    would otherwise copy every page of the parent's objects into each worker.
    """

    def __init__(self, root: str | os.PathLike, store: LabelStore | str, decoder: str = "torch",
                 targets: str = "dense"):
        if decoder not in REPLAYS:
            raise ValueError(f"decoder {decoder!r}: expected one of {sorted(REPLAYS)}")
        if targets not in TARGET_FORMS:
            raise ValueError(f"targets {targets!r}: expected one of {TARGET_FORMS}")
        self.store = _store_of(store)
        self.index = self.store.matching_index(Path(root) / "train")
        self.rows = np.setdiff1d(np.arange(self.store.num_images), self.store.skipped_rows())
        self.res, self.interpolation, self.decoder = self.store.res, self.store.interpolation, decoder
        self.targets, self.num_classes, self.residual = targets, self.store.num_classes, self.store.residual
        first = self.store.read_slot(0)
        self._slot = {name: torch.from_numpy(getattr(first, name)).share_memory_() for name in self.store.arrays}
        self._slot_read = 0  # the slot in self._slot; read and written by this process alone
        self._process = os.getpid()  # another one at __getitem__: a DataLoader worker's first item

    def set_epoch(self, epoch: int) -> None:
        """Replay slot ``epoch`` mod S from now on, here and in every DataLoader worker: call it between epochs.

        Reads the slot into shared memory when it is another than the one held; the store's identity is checked
        then (a store replaced at its URL since the dataset was made is refused).
        """
        slot = int(epoch) % self.store.num_slots
        if slot != self._slot_read:
            labels = self.store.read_slot(slot)
            for name, shared in self._slot.items():
                shared.copy_(torch.from_numpy(getattr(labels, name)))
            self._slot_read = slot

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        """What a spawned worker receives: the shared slot (as a handle), not the store, which workers never read."""
        return {**self.__dict__, "store": None}

    def _crop(self, row: int) -> np.ndarray:
        return replay_crop(self.index, row, self._slot["boxes"][row].tolist(), bool(self._slot["flips"][row]),
                           self.res, self.interpolation, self.decoder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor], int]:
        if self._process != os.getpid():
            freeze_inherited_objects()
            self._process = os.getpid()
        row = int(self.rows[i])
        image = self._crop(row)
        partner = int(self._slot["mix_partner"][row]) if "mix_partner" in self._slot else -1
        if partner >= 0:
            top, left, height, width = self._slot["mix_boxes"][row].tolist()
            pasted = self._crop(partner)
            image = np.require(image, requirements="W")  # PIL's arrays are read-only views
            image[:, top:top + height, left:left + width] = pasted[:, top:top + height, left:left + width]
        values, classes = self._slot["probs"][row].clone(), self._slot["classes"][row].long()
        if self.targets == "topk":
            return torch.from_numpy(image), (values, classes), row
        return torch.from_numpy(image), expand(values[None], classes[None], self.num_classes, self.residual)[0], row


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
