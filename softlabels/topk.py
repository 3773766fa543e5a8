"""Top-k soft-label codecs: keep the k largest probabilities, rebuild a dense target from them."""

from __future__ import annotations

import torch

from mealv2.softlabels.schema import RESIDUALS, class_dtype


def index_dtype(num_classes: int) -> torch.dtype:
    """``class_dtype`` as a torch dtype."""
    return getattr(torch, class_dtype(num_classes))


def compress(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float16 (B, k) in descending order, class indices (B, k)) of a (B, C) probability batch."""
    if not 1 <= k <= probs.shape[-1]:
        raise ValueError(f"top-k {k}: expected 1 <= k <= {probs.shape[-1]} classes")
    values, indices = torch.topk(probs.float(), k, dim=-1, largest=True, sorted=True)
    return values.half(), indices.to(index_dtype(probs.shape[-1]))


def expand(values: torch.Tensor, indices: torch.Tensor, num_classes: int, residual: str = "uniform") -> torch.Tensor:
    """Dense (B, C) float32 target from top-k values and indices.

    "uniform" spreads the missing mass 1 - sum(values) evenly over the other C - k classes
    (FKD's marginal smoothing; no class gets zero, so the log is finite); "renorm" rescales
    the k values to sum to one.
    """
    if residual not in RESIDUALS:
        raise ValueError(f"residual {residual!r}: expected one of {RESIDUALS}")
    values = values.float()
    k = values.shape[-1]
    if residual == "renorm" or k == num_classes:
        dense = torch.zeros(values.shape[0], num_classes, device=values.device)
        return dense.scatter_(1, indices.long(), values / values.sum(-1, keepdim=True).clamp_min(1e-12))
    rest = (1.0 - values.sum(-1, keepdim=True)).clamp_min(0.0) / (num_classes - k)
    dense = rest.expand(-1, num_classes).clone()
    return dense.scatter_(1, indices.long(), values)
