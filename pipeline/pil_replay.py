"""The crop replay in PIL: the decoder where DALI is absent (or slower), and the oracle the DALI graph is tested against."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps

PIL_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def replay_pil(encoded: bytes | np.ndarray, box, flip: bool, res: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode, orient upright, RGB, crop (top, left, height, width), antialiased resize to res, flip: uint8 CHW."""
    top, left, height, width = (int(v) for v in box)
    with Image.open(io.BytesIO(bytes(encoded))) as im:
        im.load()  # raises on truncated data instead of padding it silently
        upright = ImageOps.exif_transpose(im).convert("RGB")
    # crop first, then resize: the filter sees only the box's pixels, as after DALI's ROI decode
    crop = upright.crop((left, top, left + width, top + height)).resize((res, res), PIL_INTERPOLATION[interpolation])
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop).transpose(2, 0, 1)


class PilDecoder:
    """Replays a batch of crops with PIL on a thread pool (PIL releases the GIL while decoding)."""

    name = "pil"

    def __init__(self, res: int, interpolation: str = "bilinear", device: torch.device | str = "cpu",
                 threads: int = 2):
        if interpolation not in PIL_INTERPOLATION:
            raise ValueError(f"interpolation {interpolation!r}: expected one of {sorted(PIL_INTERPOLATION)}")
        self.res = res
        self.interpolation = interpolation
        self.device = torch.device(device)
        self._pool = ThreadPoolExecutor(max(1, threads))

    def decode(self, encoded: list[np.ndarray], boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """uint8 (B, 3, res, res) on the device, in the order given; a GPU copy is queued on the current stream."""
        crops = self._pool.map(
            lambda args: replay_pil(*args, self.res, self.interpolation), zip(encoded, boxes, flips))
        images = torch.from_numpy(np.stack(list(crops)))
        if self.device.type != "cuda":
            return images
        return images.pin_memory().to(self.device, non_blocking=True)
