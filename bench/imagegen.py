"""Image folders the tests generate: smooth colour fields per class, EXIF-rotated, grey, CMYK, PNG, odd sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112


def smooth_image(rng: np.random.Generator, height: int, width: int, hue: int) -> np.ndarray:
    """A smooth RGB gradient with a class-specific tint plus mild noise (JPEG-friendly, learnable)."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([np.sin(3 * x + 2 * y + phase[c] + hue * (c + 1)) for c in range(3)], axis=-1)
    noise = rng.normal(0, 0.05, (height, width, 3))
    return np.clip(127.5 + 110 * (base + noise), 0, 255).astype(np.uint8)


def save(array: np.ndarray, path: Path, kind: str = "rgb", orientation: int | None = None, quality: int = 92) -> None:
    """Write array as JPEG ("rgb", "grey", "cmyk") or PNG ("png"), optionally with an EXIF orientation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if kind == "grey":
        image = image.convert("L")
    elif kind == "cmyk":
        image = image.convert("CMYK")
    if kind == "png":
        image.save(path, "PNG")
        return
    exif = image.getexif()
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    image.save(path, "JPEG", quality=quality, exif=exif)


def make_image_folder(root: Path, split: str = "train", classes: int = 3, per_class: int = 6, seed: int = 0,
                      size: tuple[int, int] = (48, 64), mixed: bool = True, quality: int = 92) -> Path:
    """ROOT/split/class_k/img_j.{jpg,png}; with ``mixed`` the set includes every awkward kind."""
    rng = np.random.default_rng(seed)
    kinds = ["rgb", "grey", "cmyk", "png", "rot6", "rot8", "rot3", "odd"] if mixed else ["rgb"]
    split_dir = root / split
    n = 0
    for c in range(classes):
        for j in range(per_class):
            kind = kinds[n % len(kinds)]
            n += 1
            h, w = size
            if kind == "odd":
                h, w = int(rng.integers(5, 90)), int(rng.integers(5, 90))
            array = smooth_image(rng, h, w, hue=c)
            name = f"class_{c}/img_{j:03d}"
            if kind.startswith("rot"):
                save(array, split_dir / f"{name}.jpg", "rgb", orientation=int(kind[3:]), quality=quality)
            elif kind == "png":
                save(array, split_dir / f"{name}.png", "png")
            else:
                save(array, split_dir / f"{name}.jpg", "rgb" if kind == "odd" else kind, quality=quality)
    return split_dir
