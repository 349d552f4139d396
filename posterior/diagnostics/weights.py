"""Log-weight arithmetic shared by every sampler.

For unnormalised log-weights ``log w_i`` (i = 1..N) of one row, with m = max_i log w_i:

    log w̄_i  = (log w_i - m) - logsumexp_j (log w_j - m)     (normalised, logsumexp == 0)
    ESS       = 1 / sum_i w̄_i^2 = exp(-logsumexp_i 2 log w̄_i)    (Kong 1992)
    log Ẑ     = m + [logsumexp_i (log w_i - m) - log N]          (log mean exp: the evidence increment)

The max is subtracted first and added back last, so the normalised weights keep their log N (and
log k for k tied maxima) at any magnitude: with log w ~ 1e17, ``log w - logsumexp log w`` would
round log k away (logsumexp = m + log k == m in float64) and leave weights summing to k. A row
whose weights are all -inf has no normalisation; it is flagged in ``degenerate`` and its outputs
are -inf / 0, never NaN. ``normalize`` raises :class:`~posterior.errors.DegenerateWeightsError`
for such rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from posterior.errors import DegenerateWeightsError


class WeightStats(NamedTuple):
    log_weights: torch.Tensor  # (..., N) normalised; -inf on degenerate rows
    ess: torch.Tensor  # (...,) importance-sampling effective sample size in [1, N]; 0 if degenerate
    log_mean: torch.Tensor  # (...,) log mean exp of the input: the log-evidence increment
    degenerate: torch.Tensor  # (...,) bool: every weight of the row is -inf


def log_weight_stats(log_weights: torch.Tensor) -> WeightStats:
    """Normalise log-weights along the last axis and return ESS and log-mean-exp (never raises).

    Computed in the input's dtype (float16 / bfloat16 in float32).

    Parameters
    ----------
    log_weights : Tensor (..., N)
        Unnormalised log-weights; -inf allowed, NaN and +inf are not (checked by ``normalize``).
    """
    if log_weights.shape[-1] == 0:
        raise ValueError("log_weights has no particles (last dimension is 0)")
    lw = log_weights.float() if log_weights.dtype in (torch.float16, torch.bfloat16) else log_weights
    n = lw.shape[-1]
    m = lw.amax(dim=-1)  # (...,)
    degenerate = torch.isneginf(m)
    m = torch.where(degenerate, torch.zeros_like(m), m)  # shift 0 on all -inf rows: no -inf - -inf
    shifted = lw - m.unsqueeze(-1)  # (..., N) max 0; all -inf on degenerate rows
    lse = torch.logsumexp(shifted, dim=-1)  # (...,) in [0, log N]: small, so log N survives
    safe_lse = torch.where(degenerate, torch.zeros_like(lse), lse)
    normed = shifted - safe_lse.unsqueeze(-1)  # (..., N)
    ess = torch.exp(-torch.logsumexp(2.0 * normed, dim=-1))  # exp(+inf)=inf on degenerate rows
    ess = torch.where(degenerate, torch.zeros_like(ess), ess)
    log_n = torch.log(torch.tensor(float(n), dtype=lw.dtype, device=lw.device))
    log_mean = m + (lse - log_n)  # -inf on degenerate rows (lse = -inf there)
    return WeightStats(normed, ess, log_mean, degenerate)


def normalize(log_weights: torch.Tensor, *, what: str = "log_weights") -> WeightStats:
    """Like :func:`log_weight_stats`, but validates: NaN / +inf raise ``ValueError`` and rows
    with every weight at -inf raise :class:`DegenerateWeightsError` naming the rows."""
    check_log_weights(log_weights, what=what)
    stats = log_weight_stats(log_weights)
    if bool(stats.degenerate.any()):
        rows = stats.degenerate.reshape(-1).nonzero().flatten().tolist()
        raise DegenerateWeightsError(
            f"every particle has log-weight -inf in row(s) {rows} of {what} "
            f"(shape {tuple(log_weights.shape)}): no sample has positive posterior weight",
            rows=rows,
        )
    return stats


def check_log_weights(log_weights: torch.Tensor, *, what: str = "log_weights") -> None:
    """Raise ``ValueError`` naming the first NaN or +inf entry (and, for +inf, its likely cause)."""
    bad = torch.isnan(log_weights) | torch.isposinf(log_weights)
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        v = log_weights[idx].item()
        why = " (r/beta overflows float64, or a weight divides by a density of 0)" if v > 0 else ""
        raise ValueError(f"{what} has a non-finite value {v} at index {idx}{why}")


def weighted_mean(log_weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(...,) float64 sum_i w̄_i v_i from normalised log-weights (..., N); samples of weight 0 do
    not contribute (their value may be -inf)."""
    w = log_weights.double().exp()
    v = torch.where(w > 0, values.double(), 0.0)
    return (w * v).sum(-1)


__all__ = ["WeightStats", "check_log_weights", "log_weight_stats", "normalize", "weighted_mean"]
