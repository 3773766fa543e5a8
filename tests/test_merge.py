"""Merging label stores: the weighted mean of the parents' rows, rebuilt by their residual rules, cut to top-k."""

import pytest
import torch

from mealv2.softlabels.merge import merge_topk
from mealv2.softlabels.topk import compress, expand


def teacher_rows(rows: int, classes: int, seed: int) -> torch.Tensor:
    """A teacher ensemble's softmax on ``rows`` crops: peaked, every row different."""
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(rows, classes, generator=generator), dim=-1)


@pytest.mark.parametrize("residual", ["uniform", "renorm"])
def test_the_merge_is_the_weighted_mean_where_no_class_falls_outside_the_kept_ones(residual):
    classes = 12
    a, b = compress(teacher_rows(500, classes, 0), 3), compress(teacher_rows(500, classes, 1), 4)
    values, kept = merge_topk([(*a, residual), (*b, residual)], [2, 1], classes, 7)  # 7 >= 3 + 4 classes kept
    mean = (2 * expand(*a, classes, residual) + expand(*b, classes, residual)) / 3
    assert torch.allclose(expand(values, kept, classes, residual), mean, atol=1e-3)
    assert values.dtype == torch.float16 and (values[:, :-1] >= values[:, 1:]).all()


def test_a_smaller_k_keeps_the_largest_classes_of_the_mean():
    classes = 50
    a, b = compress(teacher_rows(300, classes, 2), 5), compress(teacher_rows(300, classes, 3), 5)
    values, kept = merge_topk([(*a, "uniform"), (*b, "uniform")], [1, 1], classes, 5)
    mean = (expand(*a, classes) + expand(*b, classes)) / 2
    best, best_classes = mean.topk(6, dim=-1)
    assert torch.allclose(values.float(), best[:, :5], atol=1e-3)
    clear = (best[:, :-1] - best[:, 1:] > 1e-3).all(-1)  # rows whose top-5 is not decided by float16 rounding
    assert clear.sum() > 200 and (kept.long()[clear] == best_classes[clear, :5]).all()


def test_weights_count_teachers():
    """A store of two teachers and one of one: the mean of three, not of two stores."""
    classes = 8
    a, b = compress(teacher_rows(64, classes, 4), classes), compress(teacher_rows(64, classes, 5), classes)
    values, kept = merge_topk([(*a, "uniform"), (*b, "uniform")], [2, 1], classes, classes)
    even, _ = merge_topk([(*a, "uniform"), (*b, "uniform")], [1, 1], classes, classes)
    dense = expand(values, kept, classes)
    assert torch.allclose(dense, (2 * expand(*a, classes) + expand(*b, classes)) / 3, atol=1e-3)
    assert not torch.allclose(values.float(), even.float(), atol=1e-2)


def test_a_row_both_skipped_stays_empty_and_one_skipped_by_one_store_is_refused():
    classes = 10
    a, b = compress(teacher_rows(6, classes, 6), 3), compress(teacher_rows(6, classes, 7), 3)
    for values, _ in (a, b):
        values[2] = 0
    values, kept = merge_topk([(*a, "uniform"), (*b, "uniform")], [1, 1], classes, 3)
    assert (values[2] == 0).all() and (values[[0, 1, 3, 4, 5], 0] > 0).all()
    a[0][4] = 0
    with pytest.raises(ValueError, match="row 4: labelled in some stores and empty in others"):
        merge_topk([(*a, "uniform"), (*b, "uniform")], [1, 1], classes, 3)


def test_rows_are_merged_alike_whatever_block_they_fall_in(monkeypatch):
    import mealv2.softlabels.merge as merge

    classes = 20
    parents = [(*compress(teacher_rows(1000, classes, s), 4), "uniform") for s in (8, 9, 10)]
    whole = merge_topk(parents, [1, 2, 1], classes, 6)
    monkeypatch.setattr(merge, "ROWS_AT_ONCE", 7)
    blocks = merge_topk(parents, [1, 2, 1], classes, 6)
    assert all(torch.equal(x, y) for x, y in zip(whole, blocks))
