"""Fashion-MNIST (70,000 real 28×28 grey images, 10 classes) as an ImageFolder of JPEGs: the demo's data."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

DEBIAN_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("0-tshirt", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal", "6-shirt", "7-sneaker",
           "8-bag", "9-ankle-boot")  # numbered so sorted folder names keep the official label order
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_source(source: str | None = None) -> Path:
    """The folder holding the four IDX files: --source, Debian's package, or torchvision's download."""
    candidates = [Path(source)] if source else [DEBIAN_SOURCE]
    for folder in candidates:
        if all(_find(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    if source:
        raise FileNotFoundError(f"{source}: expected the four Fashion-MNIST IDX files (train-images-idx3-ubyte...)")
    try:
        from torchvision.datasets import FashionMNIST
        root = Path(os.environ.get("MEALV2_CACHE", Path.home() / ".cache" / "mealv2")) / "torchvision"
        FashionMNIST(str(root), download=True)
        return root / "FashionMNIST" / "raw"
    except Exception as err:  # noqa: BLE001 - no network, no package: one clear message
        raise FileNotFoundError(
            "Fashion-MNIST not found: install Debian's dataset-fashion-mnist (apt-get install "
            f"dataset-fashion-mnist), pass --source DIR, or allow torchvision to download it ({err})") from None


def write_fashion_mnist(out: str | os.PathLike, limit_train: int | None = None, limit_val: int | None = None,
                        source: str | None = None) -> dict[str, int]:
    """Write OUT/train and OUT/val as class folders of JPEGs (the first N of each split); returns the counts."""
    folder = find_source(source)
    counts = {}
    for split, (images_stem, labels_stem) in FILES.items():
        images = _read_idx(_find(folder, images_stem))
        labels = _read_idx(_find(folder, labels_stem))
        limit = limit_train if split == "train" else limit_val
        count = len(images) if limit is None else min(limit, len(images))
        for name in CLASSES:
            (Path(out) / split / name).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(count), desc=f"fashion-mnist {split}", unit="img", disable=None, leave=False):
            path = Path(out) / split / CLASSES[labels[i]] / f"{i:05d}.jpg"
            if not path.exists():
                Image.fromarray(images[i], "L").save(path, "JPEG", quality=95)
        counts[split] = count
    return counts
