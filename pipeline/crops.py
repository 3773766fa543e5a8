"""Deterministic RandomResizedCrop boxes and flips, one counter-based stream per (seed, image).

Every random number is a hash of (seed, image index, draw number), so any subset, batch,
shard or process asks for an image and gets the same box: the label store depends on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params tries this many boxes before the centre fallback
_DRAWS = 2 * ATTEMPTS + 3  # (area, log-ratio) per attempt, then top, left, flip
CROP_ALGORITHM = "torchvision-rrc-v1/splitmix64"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective avalanche on uint64 (wraparound intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, indices: np.ndarray, draws: int, first: int = 0) -> np.ndarray:
    """Float64 uniforms in [0, 1), shape (len(indices), draws), a pure function of (seed, index, draw number).

    Draw numbers run from ``first``: the crops take 0-22, other consumers (mealv2.pipeline.mix) later ones.
    """
    with np.errstate(over="ignore"):
        key = _mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + _GOLDEN)
        stream = _mix64(key ^ (np.asarray(indices, dtype=np.uint64) * _GOLDEN))
        counter = np.arange(first + 1, first + draws + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix64(stream[:, None] + counter[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _fallback(height: np.ndarray, width: np.ndarray, ratio: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's centre crop used when no attempt fits: the whole image clamped to the ratio range."""
    in_ratio = width / height
    too_tall = in_ratio < ratio[0]
    too_wide = in_ratio > ratio[1]
    w = np.where(too_tall, width, np.where(too_wide, np.rint(height * ratio[1]), width))
    h = np.where(too_tall, np.rint(width / ratio[0]), height)
    return h.astype(np.int64), w.astype(np.int64)


def sample_crops(
    seed: int,
    sizes: np.ndarray,
    indices: np.ndarray | int | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[np.ndarray, np.ndarray]:
    """RandomResizedCrop boxes (top, left, height, width) int32 (N, 4) and flips bool (N,).

    ``sizes`` holds (height, width) per image; ``indices`` their dataset positions (the
    stream keys; default arange(N)). Same distribution as torchvision's get_params.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    n = len(sizes)
    indices = np.arange(n) if indices is None else np.atleast_1d(np.asarray(indices, dtype=np.int64))
    if indices.shape != (n,):
        raise ValueError(f"sample_crops: {len(indices)} indices for {n} sizes")
    if n and sizes.min() < 1:
        raise ValueError("sample_crops: every image needs height and width >= 1")
    if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"sample_crops: expected 0 < min <= max for scale {scale} and ratio {ratio}")

    u = uniforms(seed, indices, _DRAWS)
    height = sizes[:, 0:1].astype(np.float64)
    width = sizes[:, 1:2].astype(np.float64)
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0:2 * ATTEMPTS:2])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1:2 * ATTEMPTS:2])
    w_try = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
    h_try = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)

    any_fit = fits.any(axis=1)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    h_fb, w_fb = _fallback(height[:, 0], width[:, 0], ratio)
    h = np.where(any_fit, h_try[rows, first], h_fb)
    w = np.where(any_fit, w_try[rows, first], w_fb)

    h_img, w_img = sizes[:, 0], sizes[:, 1]
    u_top, u_left, u_flip = u[:, -3], u[:, -2], u[:, -1]
    top = np.where(any_fit, np.floor(u_top * (h_img - h + 1)), (h_img - h) // 2).astype(np.int64)
    left = np.where(any_fit, np.floor(u_left * (w_img - w + 1)), (w_img - w) // 2).astype(np.int64)
    boxes = np.stack([top, left, h, w], axis=1).astype(np.int32)
    return boxes, u_flip < 0.5


@dataclass(frozen=True)
class CropSpec:
    """A run's RandomResizedCrop ranges: stage one records them in the store, stage two replays them."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        for name in ("scale", "ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high or (name == "scale" and high > 1):
                limit = " <= 1" if name == "scale" else ""
                raise ValueError(f"--{name} {low} {high}: expected 0 < MIN <= MAX{limit}")
            object.__setattr__(self, name, (float(low), float(high)))

    @classmethod
    def from_options(cls, scale: tuple[float, float] | None, ratio: tuple[float, float] | None) -> "CropSpec":
        """--scale and --ratio as given, each left unset (None) taking the default."""
        return cls(**{name: value for name, value in (("scale", scale), ("ratio", ratio)) if value is not None})

    @classmethod
    def from_attrs(cls, crop: dict) -> "CropSpec":
        """The spec a store's ``crop`` attribute records."""
        if crop.get("algorithm") != CROP_ALGORITHM:
            raise ValueError(f"crop algorithm {crop.get('algorithm')!r}: this version replays {CROP_ALGORITHM!r}")
        return cls(tuple(crop["scale"]), tuple(crop["ratio"]))

    def attrs(self) -> dict:
        """The store's ``crop`` attribute (docs/store-format.md)."""
        return {"scale": list(self.scale), "ratio": list(self.ratio), "algorithm": CROP_ALGORITHM}

    def draw(self, seed: int, sizes: np.ndarray, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Boxes and flips for one seed, of every image or of those at ``positions`` (the same boxes as theirs in a
        draw of every image): the single source of stored and replayed crops."""
        if positions is None:
            return sample_crops(seed, sizes, scale=self.scale, ratio=self.ratio)
        return sample_crops(seed, sizes[positions], positions, scale=self.scale, ratio=self.ratio)


CROP_MODES = ("center", "squash")


def center_boxes(sizes: np.ndarray, crop_pct: float, mode: str = "center") -> np.ndarray:
    """Evaluation boxes of timm's eval transform, as a box the replay decodes and resizes to res.

    "center": the centre square that "resize the short side to res/crop_pct, centre crop res"
    keeps; "squash": the centre crop_pct of each side (resize to a square, then centre crop).
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"center_boxes: crop_pct must be in (0, 1], got {crop_pct}")
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r}: the replay evaluates {CROP_MODES}")
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if mode == "center":
        side = np.maximum(1, np.rint(sizes.min(axis=1) * crop_pct)).astype(np.int64)
        extent = np.stack([side, side], axis=1)
    else:
        extent = np.maximum(1, np.rint(sizes * crop_pct)).astype(np.int64)
    corner = (sizes - extent) // 2
    return np.concatenate([corner, extent], axis=1).astype(np.int32)
