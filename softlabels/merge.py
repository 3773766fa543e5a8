"""The ensemble of two or more stores' teachers from their top-k rows: the weighted mean of the parents' softmax,
rebuilt by each parent's residual rule, cut to the top-k again (`mealv2 labels merge`).

The mean is exact before the cut: a class a parent did not keep gets that parent's residual value (its missing mass
spread evenly by "uniform", nothing by "renorm"), which is what the parent's own readers train on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mealv2.softlabels.topk import index_dtype

ROWS_AT_ONCE = 4096  # rows merged together: the class matching holds (rows, kept classes, kept classes) booleans


def _kept_and_rest(values: torch.Tensor, num_classes: int, residual: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A parent's probability of each class it kept (B, k), and of every class it did not (B,), by its residual."""
    values = values.float()
    total = values.sum(-1)
    k = values.shape[-1]
    if residual == "renorm" or k == num_classes:
        return values / total.clamp_min(1e-12)[:, None], torch.zeros_like(total)
    return values, (1.0 - total).clamp_min(0.0) / (num_classes - k)


def _merge_block(parents, weights: torch.Tensor, num_classes: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    kept = [_kept_and_rest(values, num_classes, residual) for values, _, residual in parents]
    candidates = torch.cat([classes.long() for _, classes, _ in parents], dim=1)  # (B, T): every class some kept
    mean = torch.zeros(candidates.shape, dtype=torch.float32)
    rest = torch.zeros(len(candidates), dtype=torch.float32)
    for weight, (_, classes, _), (inside, outside) in zip(weights, parents, kept):
        match = candidates[:, :, None] == classes.long()[:, None, :]  # (B, T, k_p)
        found = (match * inside[:, None, :]).sum(-1)
        mean += weight * torch.where(match.any(-1), found, outside[:, None])
        rest += weight * outside
    seen_before = torch.tril(candidates[:, :, None] == candidates[:, None, :], diagonal=-1).any(-1)
    mean[seen_before] = -1.0  # one column per class
    # classes no parent kept all hold ``rest``: the lowest-numbered of them fill a row that kept fewer than k classes
    others = torch.arange(min(num_classes, k + candidates.shape[1]))[None, :].expand(len(candidates), -1)
    taken = (others[:, :, None] == candidates[:, None, :]).any(-1)
    columns = torch.cat([candidates, others], dim=1)
    means = torch.cat([mean, torch.where(taken, torch.full_like(others, -1.0, dtype=torch.float32),
                                         rest[:, None].expand(-1, others.shape[1]))], dim=1)
    order = torch.sort(means, dim=1, descending=True, stable=True).indices[:, :k]
    return means.gather(1, order).half(), columns.gather(1, order)


def merge_topk(parents: Sequence[tuple[torch.Tensor, torch.Tensor, str]], weights: Sequence[float], num_classes: int,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` (values float16 (B, k) descending, classes (B, k)) of the weighted mean of the parents' rows.

    ``parents``: per store (values float16 (B, k_p), classes (B, k_p), its residual rule); ``weights``: per store,
    normalised here (a store of two teachers weighs 2 against a store of one, as one mean of three would). A row
    every parent left empty (an image skipped) stays all zero; a row only some left empty is refused.
    """
    if not 1 <= k <= num_classes:
        raise ValueError(f"top-k {k}: expected 1 <= k <= {num_classes} classes")
    if len(parents) != len(weights) or len(parents) < 2 or min(weights) <= 0:
        raise ValueError(f"weights {list(weights)}: expected one positive weight for each of two or more stores")
    labelled = torch.stack([values[:, 0] > 0 for values, _, _ in parents])
    if (labelled != labelled[0]).any():
        row = int((labelled != labelled[0]).any(0).nonzero()[0])
        raise ValueError(f"row {row}: labelled in some stores and empty in others; their skipped images differ")
    weights = torch.tensor([float(w) for w in weights]) / sum(float(w) for w in weights)
    rows = len(parents[0][0])
    values = torch.zeros((rows, k), dtype=torch.float16)
    classes = torch.zeros((rows, k), dtype=torch.int64)
    for start in range(0, rows, ROWS_AT_ONCE):
        block = slice(start, start + ROWS_AT_ONCE)
        values[block], classes[block] = _merge_block([(v[block], c[block], r) for v, c, r in parents], weights,
                                                     num_classes, k)
    values[~labelled[0]] = 0
    classes[~labelled[0]] = 0
    return values, classes.to(index_dtype(num_classes))
