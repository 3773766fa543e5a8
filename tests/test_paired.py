"""The demo's paired statistics against values worked out by hand."""

import math

import numpy as np
import pytest

from mealv2.paired import paired_gain


def outcomes(only_other: int, only_baseline: int, both: int, neither: int):
    baseline = np.array([False] * only_other + [True] * only_baseline + [True] * both + [False] * neither)
    other = np.array([True] * only_other + [False] * only_baseline + [True] * both + [False] * neither)
    return baseline, other


def test_gain_interval_and_mcnemar_match_the_formulas():
    baseline, other = outcomes(30, 10, 700, 260)  # n = 1000
    result = paired_gain(baseline, other)
    assert result["gain"] == pytest.approx(2.0)
    exact = 2 * sum(math.comb(40, i) for i in range(11)) / 2 ** 40
    assert result["mcnemar_p"] == pytest.approx(exact, rel=1e-9)
    # normal approximation of the paired difference: sd = sqrt((b + c)/n - ((b - c)/n)^2 / 1) / sqrt(n)
    sd = 100 * math.sqrt((40 / 1000 - (20 / 1000) ** 2) / 1000)
    low, high = result["gain_ci95"]
    assert low == pytest.approx(2.0 - 1.96 * sd, abs=0.1) and high == pytest.approx(2.0 + 1.96 * sd, abs=0.1)
    assert (result["only_other_right"], result["only_baseline_right"], result["images"]) == (30, 10, 1000)


def test_identical_models_gain_nothing_for_certain():
    baseline, other = outcomes(0, 0, 50, 50)
    assert paired_gain(baseline, other) | {"images": 0} == {
        "gain": 0.0, "gain_ci95": [0.0, 0.0], "mcnemar_p": 1.0, "only_other_right": 0, "only_baseline_right": 0,
        "images": 0}


def test_a_loss_is_negative_and_mismatched_inputs_are_refused():
    baseline, other = outcomes(5, 25, 500, 470)
    result = paired_gain(baseline, other)
    assert result["gain"] == pytest.approx(-2.0) and result["gain_ci95"][1] < 0 and result["mcnemar_p"] < 0.01
    with pytest.raises(ValueError, match="equal-length"):
        paired_gain(baseline, other[:-1])
