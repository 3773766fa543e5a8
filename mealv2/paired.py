"""Two classifiers on the same test images: the gain, a bootstrap 95% interval of it, and McNemar's exact test.

Both statistics are paired: they look at each image's pair of outcomes, so the shared
difficulty of the test set cancels and only the images the two models disagree on count.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 20_000


def _binomial_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (n may be thousands)."""
    log_half_n = -n * math.log(2)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n for i in range(k + 1)]
    top = max(terms)
    return math.exp(top) * sum(math.exp(t - top) for t in terms)


def paired_gain(baseline_correct: np.ndarray, other_correct: np.ndarray, seed: int = 0) -> dict:
    """Accuracy gain of ``other`` over ``baseline`` in points, with its paired 95% interval and McNemar's p.

    The bootstrap resamples images with replacement; drawing how many of the n resampled
    images fall in each outcome class (other only right, both alike, baseline only right)
    from a multinomial is the same distribution, without materialising the resamples.
    """
    baseline = np.asarray(baseline_correct, bool)
    other = np.asarray(other_correct, bool)
    if baseline.shape != other.shape or baseline.ndim != 1 or len(baseline) == 0:
        raise ValueError(f"expected two equal-length outcome vectors, got shapes {baseline.shape} and {other.shape}")
    n = len(baseline)
    only_other = int((other & ~baseline).sum())
    only_baseline = int((baseline & ~other).sum())
    draws = np.random.default_rng(seed).multinomial(
        n, [only_other / n, only_baseline / n, 1 - (only_other + only_baseline) / n], size=RESAMPLES)
    gains = 100 * (draws[:, 0] - draws[:, 1]) / n
    discordant = only_other + only_baseline
    p = min(1.0, 2 * _binomial_tail(min(only_other, only_baseline), discordant)) if discordant else 1.0
    low, high = np.percentile(gains, [2.5, 97.5])
    return {"gain": 100 * (only_other - only_baseline) / n, "gain_ci95": [float(low), float(high)],
            "mcnemar_p": p, "only_other_right": only_other, "only_baseline_right": only_baseline, "images": n}
