"""The crop replay in torchvision: libjpeg-turbo/libpng decode, then torch's antialiased uint8 resize.

On the CPU it is the fastest path for photo-sized images (docs/benchmarks.md): its
decode is a quarter faster than PIL's. torchvision 0.29 marks its image decoding as
deprecated in favour of TorchCodec; the project pins torchvision ≤ 0.29.1, where it works.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mealv2.pipeline.decoders import INTERPOLATIONS

TORCH_INTERPOLATION = dict(zip(INTERPOLATIONS, (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC), strict=True))


def replay_torch(encoded: np.ndarray, box, flip: bool, res: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode upright RGB, crop (top, left, height, width), antialiased resize to res, flip: uint8 CHW."""
    data = torch.from_numpy(np.array(encoded, np.uint8))  # a writable copy: torch refuses read-only buffers
    image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    top, left, height, width = (int(v) for v in box)
    crop = TF.resized_crop(image, top, left, height, width, [res, res], TORCH_INTERPOLATION[interpolation],
                           antialias=True)
    return (crop.flip(-1) if flip else crop).numpy()

