"""`mealv2 data check`: decode every image of a split the way both stages will, and list the ones that fail.

A truncated or corrupt JPEG passes the header scan that builds the index and fails only
when its pixels are decoded, hours into a job. This decodes each whole image once,
through the same decoder the jobs use (DALI fails on some files PIL accepts), in batches
on the decoder's threads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mealv2.pipeline.dataset import load_index
from mealv2.pipeline.loader import ReplayLoader

_CHECK_RES = 16  # the decode is what can fail; a tiny resize keeps the check at decoding speed


def check_split(split_dir: str | os.PathLike, decoder: str = "auto", workers: int | None = None,
                batch_size: int = 64) -> tuple[int, list[str]]:
    """(images found, "path: reason" of each file that cannot be read, opened or decoded)."""
    index = load_index(split_dir, skip_bad=True)
    undecodable: dict[int, str] = {}
    loader = ReplayLoader(index, _CHECK_RES, batch_size, "cpu", decoder, "bilinear", workers,
                          on_bad=undecodable.setdefault)
    whole = np.concatenate([np.zeros_like(index.sizes), index.sizes], axis=1).astype(np.int32)
    for _ in loader.epoch(np.arange(len(index)), whole, np.zeros(len(index), bool), desc=f"check {Path(split_dir).name}"):
        pass
    bad = list(index.skipped) + [f"{index.file(i)}: cannot decode image ({reason})"
                                 for i, reason in sorted(undecodable.items())]
    return len(index) + len(index.skipped), bad
