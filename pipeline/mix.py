"""Consistent CutMix: a fixed pairing of a seed slot's images and a box per mixed image (numpy only).

Every draw comes from the crops' counter-based generator (mealv2.pipeline.crops.uniforms, draw
numbers of their own), so stage one labels the very composite that stage two rebuilds
after decoding each image once: image i's composite is its replayed crop at ``res`` with
the region of its box taken from its partner's replayed crop (docs/store-format.md). The
composites themselves are made on the device (``composites.py``); this half stays free of
torch, so that the command line, which declares --cutmix with MixSpec, starts without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mealv2.pipeline.crops import uniforms

MIX_ALGORITHM = "cutmix-pairs-v1/splitmix64"
_FIRST_DRAW = 64  # the crops use draw numbers 0-22: the mixes start well clear of them
_PAIR_KEY, _COIN, _LAMBDA, _CENTRE_Y, _CENTRE_X = range(5)


@dataclass(frozen=True)
class MixSpec:
    """``--cutmix ALPHA --mixup-prob P``, as timm means them: a pair of images is mixed with probability P,
    each member's kept share λ drawn from Beta(α, α) (α = 1: uniform); α = 0 mixes nothing."""

    alpha: float = 0.0
    prob: float = 1.0

    def __post_init__(self):
        if not self.alpha >= 0:
            raise ValueError(f"--cutmix {self.alpha}: expected CutMix's alpha, >= 0 (0: no mixing, 1: λ uniform)")
        if not 0 <= self.prob <= 1:
            raise ValueError(f"--mixup-prob {self.prob}: expected a probability, 0 <= P <= 1")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "prob", float(self.prob))

    @property
    def enabled(self) -> bool:
        return self.alpha > 0 and self.prob > 0

    def attrs(self) -> dict | None:
        """The store's ``mix`` attribute; None (no attribute) when nothing is mixed, as in stores before mixing.

        ``alpha`` is recorded only when it is not 1, so a store made before alpha existed (λ uniform) keeps
        its identity."""
        if not self.enabled:
            return None
        return {"prob": self.prob, "algorithm": MIX_ALGORITHM} | ({"alpha": self.alpha} if self.alpha != 1 else {})

    @classmethod
    def from_attrs(cls, mix: dict | None) -> "MixSpec":
        """The spec a store's ``mix`` attribute records (absent: no mixing; no ``alpha``: 1)."""
        if mix is None:
            return cls()
        if mix.get("algorithm") != MIX_ALGORITHM:
            raise ValueError(f"mix algorithm {mix.get('algorithm')!r}: this version replays {MIX_ALGORITHM!r}")
        return cls(mix.get("alpha", 1.0), mix["prob"])

    def describe(self) -> str:
        """One phrase for logs and `labels info`."""
        if not self.enabled:
            return "none"
        return f"pairs mixed with p = {self.prob:g}, λ ~ " + ("U(0, 1)" if self.alpha == 1 else
                                                                 f"Beta({self.alpha:g}, {self.alpha:g})")

    def draw(self, seed: int, num_images: int, res: int) -> "SlotMix":
        """One seed slot's pairing and boxes (at ``res``) for images 0..num_images-1."""
        partner = np.full(num_images, -1, np.int32)
        if not self.enabled:
            return SlotMix(partner, np.zeros((num_images, 4), np.int32), res)
        u = uniforms(seed, np.arange(num_images), 5, first=_FIRST_DRAW)
        order = np.argsort(u[:, _PAIR_KEY], kind="stable")  # a random matching: neighbours in a random order
        pairs = order[:num_images - num_images % 2].reshape(-1, 2)
        pairs = pairs[u[pairs[:, 0], _COIN] < self.prob]
        partner[pairs[:, 0]], partner[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]
        boxes = cutmix_boxes(beta_quantile(u[:, _LAMBDA], self.alpha), u[:, _CENTRE_Y], u[:, _CENTRE_X], res)
        boxes[partner < 0] = 0
        return SlotMix(partner, boxes, res)


_QUANTILE_GRID = 1 << 16  # points of the tabulated Beta CDF: quantiles within about 1e-9


def beta_quantile(u: np.ndarray, alpha: float) -> np.ndarray:
    """Beta(α, α)'s inverse CDF at ``u`` in [0, 1): how a counter-based uniform becomes timm's λ.

    α = 1 is the uniform itself (so stores made before α existed replay unchanged). Otherwise the
    CDF below 1/2 is tabulated in s = x^α, where ∫ t^(α-1) (1-t)^(α-1) dt becomes the smooth
    (1/α) ∫ (1 - s^(1/α))^(α-1) ds, inverted by interpolation, and mirrored above 1/2 (symmetry).
    """
    u = np.asarray(u, np.float64)
    if alpha == 1:
        return u
    s = np.linspace(0.0, 0.5 ** alpha, _QUANTILE_GRID)
    density = (1.0 - s ** (1.0 / alpha)) ** (alpha - 1.0)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) * np.diff(s) / 2)])
    cdf *= 0.5 / cdf[-1]  # F(1/2) = 1/2 exactly
    low = np.minimum(u, 1.0 - u)
    x = np.interp(low, cdf, s) ** (1.0 / alpha)
    return np.where(u <= 0.5, x, 1.0 - x)


def cutmix_boxes(lam: np.ndarray, centre_y: np.ndarray, centre_x: np.ndarray, res: int) -> np.ndarray:
    """timm's CutMix box (rand_bbox) from λ (drawn from Beta(α, α)) and a uniform centre: (top, left, h, w) int32.

    The side is int(res * sqrt(1 - λ)), centred on a pixel drawn uniformly (the odd pixel
    below it) and clipped to the image, so the pasted share is at most 1 - λ.
    """
    side = np.floor(res * np.sqrt(1.0 - lam)).astype(np.int64)
    corners = []
    for centre in (np.floor(centre_y * res).astype(np.int64), np.floor(centre_x * res).astype(np.int64)):
        low, high = np.clip(centre - side // 2, 0, res), np.clip(centre + (side + 1) // 2, 0, res)
        corners.append((low, high - low))
    (top, height), (left, width) = corners
    return np.stack([top, left, height, width], axis=1).astype(np.int32)


@dataclass
class SlotMix:
    """One seed slot's mixes: each image's partner (-1: unmixed) and its pasted box (top, left, h, w) at ``res``."""

    partner: np.ndarray  # (N,) int32
    boxes: np.ndarray    # (N, 4) int32
    res: int

    def at_res(self, res: int) -> "SlotMix":
        """The same mixes for crops replayed at another resolution: boxes scaled (rounded) to ``res``."""
        if res == self.res:
            return self
        scaled = np.rint(self.boxes.astype(np.float64) * (res / self.res)).astype(np.int32)
        return SlotMix(self.partner, scaled, res)

    def groups(self, positions: np.ndarray) -> np.ndarray:
        """``positions`` as rows of two (G, 2): each mixed pair whole, the rest two by two, -1 filling a last row.

        A pair whose partner is not among ``positions`` is not mixed in this epoch's batches.
        """
        positions = np.asarray(positions, np.int64)
        partner = self.partner[positions]
        present = np.isin(partner, positions)
        firsts = positions[present & (partner > positions)]
        singles = positions[~present]
        if len(singles) % 2:
            singles = np.append(singles, -1)
        return np.concatenate([np.stack([firsts, self.partner[firsts]], axis=1), singles.reshape(-1, 2)])

    def unit_order(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 in the order stage one decodes them: mixed pairs whole, partners from other rows
        included, then the unmixed, so that batches of an even size hold whole pairs."""
        partner = self.partner[start:stop]
        rows = self.groups(np.union1d(np.arange(start, stop), partner[partner >= 0])).ravel()
        return rows[rows >= 0]
