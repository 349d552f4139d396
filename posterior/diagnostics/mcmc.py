"""MCMC diagnostics of reward traces: split R-hat and the autocorrelation effective sample size
(Gelman & Rubin 1992; Geyer 1992), via ``pyro.ops.stats``. The MCMC ESS is named ``mcmc_ess``,
apart from the importance-sampling ESS of weights."""

from __future__ import annotations

import math

import torch


def reward_trace_diagnostics(trace: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split R-hat and MCMC effective sample size of reward traces, per prompt.

    Parameters
    ----------
    trace : Tensor (P, N, K)
        Rewards of N chains at K kept steps.

    Returns
    -------
    r_hat, mcmc_ess : Tensor (P,) float64
        NaN for a prompt whose trace has a non-finite reward, is constant, or is too short
        (split R-hat needs K >= 4, the ESS K >= 2).
    """
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    P, K = trace.shape[0], trace.shape[-1]
    r_hat = torch.full((P,), math.nan, dtype=torch.float64)
    ess = torch.full((P,), math.nan, dtype=torch.float64)
    for p in range(P):
        x = trace[p].double()  # (N, K)
        if not bool(torch.isfinite(x).all()) or float(x.var(unbiased=False)) == 0.0:
            continue
        if K >= 4:
            r_hat[p] = split_gelman_rubin(x, chain_dim=0, sample_dim=1)
        if K >= 2:
            ess[p] = effective_sample_size(x, chain_dim=0, sample_dim=1)
    return r_hat, ess


#: Kept states per chain each diagnostic needs: split R-hat halves every chain (2 states per half).
MIN_KEPT = {"r_hat": 4, "mcmc_ess": 2}


def too_short(K: int, *, steps: int, burn_in: int, thin: int) -> dict[str, str]:
    """``{key: reason}`` for the diagnostics a trace of K kept states per chain cannot give."""
    kept = f"this run kept {K} (steps={steps}, burn_in={burn_in}, thin={thin}): lower burn_in or thin, or raise steps"
    names = {"r_hat": "split R-hat", "mcmc_ess": "the MCMC ESS"}
    return {k: f"{names[k]} needs >= {m} kept states per chain; {kept}" for k, m in MIN_KEPT.items() if K < m}


def finite_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    finite = torch.isfinite(x)
    s = torch.where(finite, x, 0.0).sum(dim)
    c = finite.sum(dim)
    return torch.where(c > 0, s / c.clamp(min=1), math.nan)


__all__ = ["finite_mean", "reward_trace_diagnostics"]
