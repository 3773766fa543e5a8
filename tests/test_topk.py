"""compress / expand: top-k values in order, FKD's uniform residual, renormalisation."""

import pytest
import torch

from mealv2.softlabels.topk import compress, expand


def test_compress_keeps_the_k_largest_in_descending_order():
    probs = torch.tensor([[0.1, 0.6, 0.05, 0.25], [0.4, 0.3, 0.2, 0.1]])
    values, indices = compress(probs, 2)
    assert values.dtype == torch.float16 and indices.dtype == torch.uint16
    torch.testing.assert_close(values.float(), torch.tensor([[0.6, 0.25], [0.4, 0.3]]), atol=1e-3, rtol=0)
    assert indices.long().tolist() == [[1, 3], [0, 1]]


def test_uniform_residual_spreads_the_missing_mass():
    values = torch.tensor([[0.6, 0.25]]).half()
    indices = torch.tensor([[1, 3]])
    dense = expand(values, indices, 4, "uniform")
    expected = torch.tensor([[0.075, 0.6, 0.075, 0.25]])
    torch.testing.assert_close(dense, expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(dense.sum(-1), torch.ones(1))
    assert (dense > 0).all()


def test_renorm_rescales_the_kept_values():
    dense = expand(torch.tensor([[0.6, 0.2]]), torch.tensor([[2, 0]]), 3, "renorm")
    torch.testing.assert_close(dense, torch.tensor([[0.25, 0.0, 0.75]]))


def test_full_k_round_trips():
    probs = torch.softmax(torch.randn(5, 7), -1)
    dense = expand(*compress(probs, 7), 7, "uniform")
    torch.testing.assert_close(dense, probs, atol=1e-3, rtol=0)


def test_bad_k_and_residual_are_refused():
    with pytest.raises(ValueError, match="top-k 5"):
        compress(torch.rand(2, 3), 5)
    with pytest.raises(ValueError, match="residual"):
        expand(torch.rand(1, 1), torch.zeros(1, 1, dtype=torch.long), 3, "bogus")
