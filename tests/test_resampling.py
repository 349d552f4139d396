"""Resampling schemes (posterior/samplers/resampling.py): exact cases first, then offspring-count
statistics over many independent rows (one batched call, fixed seeds, 3-sigma tolerances)."""

import math

import pytest
import torch

import posterior as pst
from posterior.samplers.resampling import RESAMPLERS, get_resampler, offspring_counts

SCHEMES = sorted(RESAMPLERS)
W = torch.tensor([0.30, 0.02, 0.18, 0.0, 0.25, 0.05, 0.15, 0.05], dtype=torch.float64)  # one zero weight
N = W.numel()


def counts_over_rows(scheme: str, rows: int, num_samples: int = N, seed: int = 0) -> torch.Tensor:
    """Offspring counts (rows, N) of ``rows`` independent resamplings of the weights W."""
    log_w = W.log().expand(rows, N)
    anc = get_resampler(scheme)(log_w, num_samples, generator=torch.Generator().manual_seed(seed))
    assert anc.shape == (rows, num_samples) and anc.dtype == torch.int64
    return offspring_counts(anc, N).double()


def test_registry_holds_the_four_schemes_and_unknown_names_raise():
    assert set(SCHEMES) == {"multinomial", "stratified", "systematic", "residual"}
    with pytest.raises(ValueError, match="'bogus'"):
        get_resampler("bogus")


@pytest.mark.parametrize("scheme", ["stratified", "systematic", "residual"])
def test_uniform_weights_give_every_particle_exactly_one_offspring(scheme):
    anc = get_resampler(scheme)(torch.zeros(3, 7), 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(anc, torch.arange(7).expand(3, 7))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_finite_weight_takes_every_offspring(scheme):
    lw = torch.full((2, 5), -math.inf)
    lw[0, 3], lw[1, 0] = 0.0, -7.0
    anc = get_resampler(scheme)(lw, 6, generator=torch.Generator().manual_seed(1))
    assert anc[0].tolist() == [3] * 6 and anc[1].tolist() == [0] * 6


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_weight_particles_are_never_chosen_and_shapes_batch(scheme):
    lw = W.log().expand(2, 3, N)  # leading batch dims (2, 3)
    anc = get_resampler(scheme)(lw, 11, generator=torch.Generator().manual_seed(2))
    assert anc.shape == (2, 3, 11)
    assert ((anc >= 0) & (anc < N)).all() and not (anc == 3).any()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_draws_come_from_the_generator_only(scheme):
    lw = W.log().expand(4, N)
    torch.manual_seed(123)
    a = get_resampler(scheme)(lw, N, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(456)  # the global RNG must not matter
    b = get_resampler(scheme)(lw, N, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_zero_weights_raise_degenerate(scheme):
    with pytest.raises(pst.DegenerateWeightsError):
        get_resampler(scheme)(torch.full((2, 4), -math.inf), 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("num_samples", [N, 13])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_offspring_counts_have_mean_M_times_w(scheme, num_samples):
    """Unbiasedness: E[#offspring of i] = M w_i, within 3 standard errors over 20,000 rows
    (exactly, where a scheme makes a count deterministic)."""
    rows = 20_000
    c = counts_over_rows(scheme, rows, num_samples, seed=3)
    mean, se = c.mean(0), c.std(0) / math.sqrt(rows)
    expect = num_samples * W
    assert torch.all((mean - expect).abs() <= 3 * se + 1e-12), (scheme, mean, expect, se)
    assert torch.all(c.sum(-1) == num_samples)


def test_multinomial_offspring_variance_is_M_w_1_minus_w():
    rows = 20_000
    c = counts_over_rows("multinomial", rows, seed=4)
    var = c.var(0)
    expect = N * W * (1 - W)
    # The sample variance of a count has standard error about sqrt(2/rows)·var (+ a kurtosis term).
    assert torch.all((var - expect).abs() <= 4 * math.sqrt(2 / rows) * expect + 0.02)


@pytest.mark.parametrize("scheme", ["stratified", "systematic", "residual"])
def test_low_variance_schemes_have_lower_offspring_variance_than_multinomial(scheme):
    rows = 20_000
    multi = counts_over_rows("multinomial", rows, seed=5).var(0)  # (N,)
    low = counts_over_rows(scheme, rows, seed=6).var(0)
    assert low.sum() < 0.75 * multi.sum()
    # Particle by particle too: never above multinomial (beyond sampling error).
    assert torch.all(low <= multi * (1 + 6 * math.sqrt(2 / rows)) + 1e-9)
    # Systematic and stratified keep each count within one of its mean M w_i.
    if scheme in ("stratified", "systematic"):
        c = counts_over_rows(scheme, 2000, seed=7)
        assert torch.all((c - N * W).abs() < 2.0)
    if scheme == "systematic":
        c = counts_over_rows(scheme, 2000, seed=8)
        assert torch.all((c >= torch.floor(N * W)) & (c <= torch.ceil(N * W)))
