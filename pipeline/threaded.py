"""A batch decoder that replays image by image on a thread pool (PIL's, pil_replay.PilDecoder).

PIL releases the GIL while decoding and resizing, so threads decode in parallel.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from mealv2.pipeline.distributed import as_device


class ThreadedDecoder:
    """Replays a batch of crops with ``replay`` (encoded, box, flip, res, interpolation) → uint8 CHW array."""

    name: str  # each subclass sets these two
    replay: Callable[[np.ndarray, np.ndarray, bool, int, str], np.ndarray]

    def __init__(self, res: int, interpolation: str = "bilinear", device: torch.device | str = "cpu",
                 threads: int = 2):
        self.res = res
        self.interpolation = interpolation  # one of decoders.INTERPOLATIONS (ReplayLoader checks)
        self.device = as_device(device)
        self._pool = ThreadPoolExecutor(max(1, threads))

    def close(self) -> None:
        self._pool.shutdown()

    def decode(self, encoded: list[np.ndarray], boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """uint8 (B, 3, res, res) on the device, in the order given; a GPU copy is queued on the current stream."""
        crops = self._pool.map(lambda args: self.replay(*args, self.res, self.interpolation),
                               zip(encoded, boxes, flips))
        images = torch.from_numpy(np.stack(list(crops)))
        if self.device.type != "cuda":
            return images
        return images.pin_memory().to(self.device, non_blocking=True)
