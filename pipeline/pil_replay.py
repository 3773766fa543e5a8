"""The crop replay in PIL: the oracle every other decoder is tested against."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from mealv2.pipeline.decoders import INTERPOLATIONS
from mealv2.pipeline.threaded import ThreadedDecoder

PIL_INTERPOLATION = dict(zip(INTERPOLATIONS, (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC), strict=True))


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


class PilDecoder(ThreadedDecoder):
    """Replays a batch with PIL on a thread pool."""

    name = "pil"
    replay = staticmethod(replay_pil)
