"""Quasi-rejection sampling diagnostics (Eikema, Kruszewski, Dance, Aziz & Dymetman 2022).

For proposal draws x_1..x_N ~ q with log-weights log w_i = log P(x_i) - log q(x_i) (P the
unnormalised target) and a bound B, QRS samples p_B(x) ∝ min(q(x) B, P(x)). With the
self-normalised empirical distributions over the draws

    p̂_i = w_i / sum_j w_j                (pi*)        p̂B_i = min(w_i, B) / sum_j min(w_j, B)   (p_B)

the estimates are

    Ẑ = mean w,   AR = mean min(w/B, 1),   TV(pi*, p_B) ≈ 1/2 sum_i |p̂_i - p̂B_i|,
    KL(pi* || p_B) ≈ sum_i p̂_i log(p̂_i / p̂B_i).

Both divergences are those of two distributions over the same N atoms, so they are >= 0 by
construction (Gibbs' inequality); computing them from normalised log-probabilities keeps them so
up to rounding, and the KL is clamped at 0 to remove that rounding.
"""

from __future__ import annotations

import math

import torch

from posterior.diagnostics.weights import log_weight_stats


def qrs_estimates(log_w: torch.Tensor, log_bound: float) -> dict[str, float]:
    """QRS diagnostics from the proposal draws' log-weights (see the module docstring).

    Parameters
    ----------
    log_w : Tensor (N,)
        log w_i of every proposal draw (-inf allowed; not all).
    log_bound : float
        log B, finite. Both may be shifted by the same constant: only ``log_Z`` moves (by it).

    Returns
    -------
    dict
        ``log_Z`` (float64 log mean w), ``acceptance_rate``, ``tv``, ``kl`` (>= 0).
    """
    if not math.isfinite(log_bound):
        raise ValueError(f"log_bound must be finite, got {log_bound!r}")
    log_w = log_w.double().reshape(-1)
    if bool(torch.isnan(log_w).any() | torch.isposinf(log_w).any()):
        raise ValueError("qrs_estimates: log-weights contain NaN or +inf")
    log_m = torch.clamp(log_w, max=log_bound)  # log min(w, B)
    full, clipped = log_weight_stats(log_w), log_weight_stats(log_m)
    if bool(full.degenerate):
        raise ValueError(f"qrs_estimates: all {log_w.numel()} log-weights are -inf")
    p, pB = full.log_weights.exp(), clipped.log_weights.exp()  # (N,) each sums to 1
    tv = 0.5 * (p - pB).abs().sum()
    kl = torch.where(p > 0, p * (full.log_weights - clipped.log_weights), 0.0).sum()
    return {
        "log_Z": float(full.log_mean),
        "acceptance_rate": float(torch.exp(log_m - log_bound).mean()),
        "tv": float(tv),
        "kl": max(0.0, float(kl)),
    }


__all__ = ["qrs_estimates"]
