"""Crop replay image by image in worker processes: a map-style Dataset over an epoch plan, fed to torch's DataLoader.

On the CPU, torchvision's decode and resize run fastest in processes (no GIL, no
shared allocator), which is how a torchvision ``DataLoader`` user already trains; the
loader's torchvision path is this dataset, and ``mealv2.ReplayDataset`` replays a store's
crops with the same ``replay_crop``.
"""

from __future__ import annotations

import gc

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, default_collate

from mealv2.pipeline.dataset import DatasetError, DatasetIndex
from mealv2.pipeline.epoch_plan import read_bytes
from mealv2.pipeline.errors import first_line
from mealv2.pipeline.pil_replay import replay_pil
from mealv2.pipeline.torch_replay import replay_torch

REPLAYS = {"torch": replay_torch, "pil": replay_pil}


class UndecodableImage(DatasetError):
    """One file that could not be read or decoded, with the reason the library gave."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot decode image ({reason})")
        self.path, self.reason = path, reason


def freeze_inherited_objects(_worker: int = 0) -> None:
    """In a forked DataLoader worker (a ``worker_init_fn``): keep the garbage collector off the objects inherited from
    the parent. A collection writes into every object it visits, which copies each page they sit on into the worker
    (measured: 104 MB a worker within one epoch, whatever the dataset held); frozen ones are never visited again."""
    gc.freeze()


def replay_crop(index: DatasetIndex, position: int, box, flip: bool, res: int, interpolation: str,
                decoder: str = "torch") -> np.ndarray:
    """Image ``position`` of ``index`` decoded, cropped to ``box``, resized to ``res`` and flipped: uint8 (3, res, res)."""
    path = index.file(position)
    try:
        return REPLAYS[decoder](read_bytes(path), box, flip, res, interpolation)
    except Exception as err:  # noqa: BLE001 - any failure on one file is that file's
        raise UndecodableImage(path, first_line(err, 200)) from None


class _PlannedCrops(Dataset):
    """Item ``position``: (its crop as uint8 CHW, or None if it failed; the position; the reason).

    The boxes and flips sit in shared memory, so persistent workers replay each new epoch's plan.
    """

    def __init__(self, index: DatasetIndex, res: int, interpolation: str, decoder: str):
        self.index, self.res, self.interpolation, self.decoder = index, res, interpolation, decoder
        self.boxes = torch.zeros((len(index), 4), dtype=torch.int32).share_memory_()
        self.flips = torch.zeros(len(index), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int):
        try:
            crop = replay_crop(self.index, position, self.boxes[position].tolist(), bool(self.flips[position]),
                               self.res, self.interpolation, self.decoder)
        except UndecodableImage as err:  # reported by the consumer, which stops or leaves the file out (--skip-bad)
            return None, position, err.reason
        return torch.from_numpy(crop), position, ""


class _Order(Sampler):
    """The epoch's dataset positions, set before each pass."""

    def __init__(self):
        self.order: list[int] = []

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _collate(items: list) -> tuple[torch.Tensor | None, np.ndarray, dict[int, str]]:
    """(the decoded crops stacked, their positions, {position: reason} of the files that failed)."""
    good = [(crop, position) for crop, position, _ in items if crop is not None]
    failed = {position: reason for crop, position, reason in items if crop is None}
    images = default_collate([crop for crop, _ in good]) if good else None  # in a worker: stacked into shared memory
    return images, np.asarray([position for _, position in good], np.int64), failed


class WorkerReplay:
    """Replays epoch plans in ``workers`` persistent DataLoader processes (0: in this process), batches in order."""

    def __init__(self, index: DatasetIndex, res: int, interpolation: str, decoder: str, batch_size: int,
                 workers: int, pin_memory: bool = False):
        self._crops = _PlannedCrops(index, res, interpolation, decoder)
        self._order = _Order()
        self._loader = DataLoader(self._crops, batch_sampler=BatchSampler(self._order, batch_size, drop_last=False),
                                  num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
                                  worker_init_fn=freeze_inherited_objects,
                                  persistent_workers=workers > 0, prefetch_factor=2 if workers else None)

    def close(self) -> None:
        """End the worker processes now (dropping the DataLoader ends its persistent workers)."""
        self._loader = None

    def batches(self, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray):
        """Iterate (images uint8 (B, 3, res, res) or None, positions, {position: reason}) over ``order``.

        ``boxes`` (N, 4) and ``flips`` (N,) are indexed by dataset position. One pass at a time.
        """
        self._crops.boxes.copy_(torch.from_numpy(np.ascontiguousarray(boxes, np.int32)))
        self._crops.flips.copy_(torch.from_numpy(np.ascontiguousarray(flips, np.bool_)))
        self._order.order = np.asarray(order, np.int64).tolist()
        return iter(self._loader)
