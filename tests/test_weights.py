"""Exact answers for the log-weight helper every sampler uses."""

import math

import pytest
import torch

from posterior.diagnostics import log_weight_stats, normalize
from posterior.errors import DegenerateWeightsError


def test_ess_of_one_finite_weight_is_one():
    lw = torch.tensor([[-math.inf, 3.0, -math.inf, -math.inf]])
    s = normalize(lw)
    assert s.ess.item() == pytest.approx(1.0, abs=1e-12)
    assert s.log_weights[0, 1].item() == 0.0
    assert s.log_mean.item() == pytest.approx(3.0 - math.log(4))


def test_ess_of_uniform_weights_is_n():
    for n in (1, 7, 1000):
        s = normalize(torch.full((2, n), -12.5))
        assert torch.allclose(s.ess, torch.full((2,), float(n)))
        assert torch.allclose(s.log_mean, torch.full((2,), -12.5))


def test_normalised_weights_sum_to_one_and_match_softmax():
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(5, 33, generator=g, dtype=torch.float64) * 30
    s = normalize(lw)
    assert torch.allclose(torch.logsumexp(s.log_weights, -1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    w = torch.softmax(lw, -1)
    assert torch.allclose(s.ess, 1 / (w**2).sum(-1))


def test_large_log_weights_do_not_overflow():
    s = normalize(torch.tensor([[1e4, 1e4 + math.log(3.0)]], dtype=torch.float64))
    assert s.log_weights.exp().tolist()[0] == pytest.approx([0.25, 0.75])


def test_all_neg_inf_row_is_flagged_not_nan():
    lw = torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]])
    s = log_weight_stats(lw)
    assert s.degenerate.tolist() == [False, True]
    assert not torch.isnan(s.log_weights).any() and not torch.isnan(s.ess).any()
    with pytest.raises(DegenerateWeightsError, match=r"row\(s\) \[1\]"):
        normalize(lw)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_pos_inf_log_weights_raise(bad):
    with pytest.raises(ValueError, match="non-finite value"):
        normalize(torch.tensor([[0.0, bad]]))


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening.py (issue 11: numbers never silently wrong, inputs checked at the boundary); each test is named after what broke
# --------------------------------------------------------------------------------------------------
def test_normalised_weights_keep_log_n_when_log_weights_are_1e17():
    """logsumexp([1e17] * 3) == 1e17 in float64: subtracting it left three weights of 1 each."""
    lw = torch.tensor([[1e17, 1e17, 1e17, -math.inf]], dtype=torch.float64)
    s = log_weight_stats(lw)
    assert s.log_weights.exp()[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0], rel=1e-15)
    assert s.ess.item() == pytest.approx(3.0, rel=1e-15)
    assert s.log_mean.item() == 1e17  # 1e17 + log(3/4) rounds to 1e17
