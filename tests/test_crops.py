"""sample_crops: torchvision's RandomResizedCrop distribution, counter-based determinism, edge sizes;
CropSpec: a run's ranges reach the boxes and round-trip through a store's attributes."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from mealv2.pipeline.crops import CROP_ALGORITHM, CropSpec, center_boxes, sample_crops


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance between empirical distributions."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def torchvision_boxes(height: int, width: int, n: int) -> np.ndarray:
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    return np.array([RandomResizedCrop.get_params(image, scale, ratio) for _ in range(n)])


@pytest.mark.parametrize("height,width", [(375, 500), (600, 120), (40, 33)])
def test_distribution_matches_torchvision(height, width):
    n = 20000
    ours, _ = sample_crops(7, np.tile([height, width], (n, 1)))
    theirs = torchvision_boxes(height, width, n)
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)  # noqa: E731
    aspect = lambda b: np.log(b[:, 3] / b[:, 2])  # noqa: E731
    bound = 1.95 * np.sqrt(2 / n)  # KS critical value at alpha = 0.001
    assert ks_statistic(area(ours), area(theirs)) < bound
    assert ks_statistic(aspect(ours), aspect(theirs)) < bound
    assert ks_statistic(ours[:, 0] / height, theirs[:, 0] / height) < bound
    assert ks_statistic(ours[:, 1] / width, theirs[:, 1] / width) < bound


def test_fallback_rate_matches_torchvision():
    n = 20000
    height, width = 10, 200  # far outside the ratio range: most attempts fail
    ours, _ = sample_crops(3, np.tile([height, width], (n, 1)))
    theirs = torchvision_boxes(height, width, n)
    fallback = (height, round(height * 4 / 3))
    ours_rate = np.mean((ours[:, 2] == fallback[0]) & (ours[:, 3] == fallback[1]))
    theirs_rate = np.mean((theirs[:, 2] == fallback[0]) & (theirs[:, 3] == fallback[1]))
    assert abs(ours_rate - theirs_rate) < 0.02


def test_flips_are_fair_and_independent_of_boxes():
    boxes, flips = sample_crops(1, np.tile([300, 400], (40000, 1)))
    assert abs(flips.mean() - 0.5) < 0.01
    assert abs(np.corrcoef(flips, boxes[:, 2])[0, 1]) < 0.02


@pytest.mark.parametrize("height,width", [(1, 1), (1, 500), (500, 1), (2, 3), (7, 7), (4000, 3)])
def test_every_box_is_inside_the_image(height, width):
    boxes, _ = sample_crops(0, np.tile([height, width], (2000, 1)))
    top, left, h, w = boxes.T
    assert boxes.dtype == np.int32
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()


def test_subsets_and_single_images_get_the_same_boxes():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 1000, (500, 2))
    boxes, flips = sample_crops(11, sizes)
    subset = rng.choice(500, 37, replace=False)
    sub_boxes, sub_flips = sample_crops(11, sizes[subset], indices=subset)
    np.testing.assert_array_equal(sub_boxes, boxes[subset])
    np.testing.assert_array_equal(sub_flips, flips[subset])
    one_box, one_flip = sample_crops(11, sizes[123], indices=123)
    np.testing.assert_array_equal(one_box[0], boxes[123])
    assert one_flip[0] == flips[123]


def test_seeds_differ():
    sizes = np.tile([300, 400], (1000, 1))
    a, _ = sample_crops(0, sizes)
    b, _ = sample_crops(1, sizes)
    assert (a != b).any(axis=1).mean() > 0.99


def test_same_boxes_in_another_process():
    code = ("import numpy as np; from mealv2.pipeline.crops import sample_crops; "
            "b, f = sample_crops(5, np.arange(2, 402).reshape(200, 2)); "
            "print(int(b.astype(np.int64).sum()), int((b * np.arange(4)).sum()), int(f.sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    boxes, flips = sample_crops(5, np.arange(2, 402).reshape(200, 2))
    assert out == [str(int(boxes.astype(np.int64).sum())), str(int((boxes * np.arange(4)).sum())), str(int(flips.sum()))]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="height and width"):
        sample_crops(0, np.array([[0, 5]]))
    with pytest.raises(ValueError, match="indices"):
        sample_crops(0, np.ones((3, 2)), indices=[1, 2])


def test_center_boxes_select_the_eval_square():
    boxes = center_boxes(np.array([[100, 200], [64, 64]]), 0.875)
    np.testing.assert_array_equal(boxes, [[6, 56, 88, 88], [4, 4, 56, 56]])


def test_crop_spec_ranges_reach_the_boxes():
    sizes = np.full((2000, 2), 100)
    areas = {}
    for scale in ((0.08, 1.0), (0.5, 1.0)):
        boxes, _ = CropSpec(scale=scale).draw(3, sizes)
        areas[scale] = boxes[:, 2] * boxes[:, 3] / 100 ** 2
        np.testing.assert_array_equal(boxes, sample_crops(3, sizes, scale=scale)[0])
    assert areas[(0.08, 1.0)].min() < 0.1 and areas[(0.5, 1.0)].min() > 0.48  # rounding of w and h: ±2%
    wide, _ = CropSpec(ratio=(2.0, 2.0)).draw(0, sizes)
    assert np.allclose(wide[:, 3] / wide[:, 2], 2.0, atol=0.15)


def test_crop_spec_round_trips_through_store_attrs():
    spec = CropSpec(scale=(0.25, 1), ratio=(0.5, 2))
    assert spec.attrs() == {"scale": [0.25, 1.0], "ratio": [0.5, 2.0], "algorithm": CROP_ALGORITHM}
    assert CropSpec.from_attrs(spec.attrs()) == spec
    with pytest.raises(ValueError, match="crop algorithm 'other'"):
        CropSpec.from_attrs({**spec.attrs(), "algorithm": "other"})
    for bad, message in [({"scale": (0.5, 0.2)}, "--scale 0.5 0.2: expected 0 < MIN <= MAX <= 1"),
                         ({"scale": (0.5, 1.5)}, "<= 1"), ({"ratio": (0.0, 1.0)}, "--ratio 0.0 1.0")]:
        with pytest.raises(ValueError, match=message):
            CropSpec(**bad)
