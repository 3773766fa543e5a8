"""Crop replay image by image in worker processes: a map-style Dataset over an epoch plan, fed to torch's DataLoader.

On the CPU, torchvision's decode and resize run fastest in processes (no GIL, no
shared allocator), which is how a torchvision ``DataLoader`` user already trains; the
loader's torchvision path is this dataset, and ``mealv2.ReplayDataset`` replays a store's
crops with the same ``replay_crop``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mealv2.pipeline.dataset import DatasetError, DatasetIndex
from mealv2.pipeline.epoch_plan import read_bytes
from mealv2.pipeline.pil_replay import replay_pil
from mealv2.pipeline.torch_replay import replay_torch

REPLAYS = {"torch": replay_torch, "pil": replay_pil}


class UndecodableImage(DatasetError):
    """One file that could not be read or decoded, with the reason the library gave."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot decode image ({reason})")
        self.path, self.reason = path, reason


def replay_crop(index: DatasetIndex, position: int, box, flip: bool, res: int, interpolation: str,
                decoder: str = "torch") -> np.ndarray:
    """Image ``position`` of ``index`` decoded, cropped to ``box``, resized to ``res`` and flipped: uint8 (3, res, res)."""
    path = index.file(position)
    try:
        return REPLAYS[decoder](read_bytes(path), box, flip, res, interpolation)
    except Exception as err:  # noqa: BLE001 - any failure on one file is that file's
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise UndecodableImage(path, (lines or [type(err).__name__])[0][:200]) from None


class PlannedCrops(Dataset):
    """Item k of an epoch plan: (the crop of ``order[k]`` as uint8 CHW, or None if it failed; the position; the reason)."""

    def __init__(self, index: DatasetIndex, order: np.ndarray, boxes: np.ndarray, flips: np.ndarray, res: int,
                 interpolation: str, decoder: str = "torch"):
        self.index, self.order = index, np.asarray(order, np.int64)
        self.boxes, self.flips = boxes, flips
        self.res, self.interpolation, self.decoder = res, interpolation, decoder

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int):
        position = int(self.order[k])
        try:
            crop = replay_crop(self.index, position, self.boxes[position], bool(self.flips[position]), self.res,
                               self.interpolation, self.decoder)
        except UndecodableImage as err:  # reported by the consumer, which stops or leaves the file out (--skip-bad)
            return None, position, err.reason
        return torch.from_numpy(crop), position, ""


def collate_planned(items: list) -> tuple[torch.Tensor | None, np.ndarray, dict[int, str]]:
    """(the decoded crops stacked, their positions, {position: error} of the files that failed)."""
    good = [(crop, position) for crop, position, _ in items if crop is not None]
    failed = {position: reason for crop, position, reason in items if crop is None}
    images = torch.stack([crop for crop, _ in good]) if good else None
    return images, np.asarray([position for _, position in good], np.int64), failed


def planned_batches(plan: PlannedCrops, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """The plan in order, ``batch_size`` at a time, decoded by ``workers`` processes (0: in this process)."""
    return DataLoader(plan, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_planned,
                      pin_memory=pin_memory, prefetch_factor=2 if workers else None)
