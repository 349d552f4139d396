"""Log-weight arithmetic shared by every sampler.

For unnormalised log-weights ``log w_i`` (i = 1..N) of one row:

    log w̄_i  = log w_i - logsumexp_j log w_j                (normalised, logsumexp == 0)
    ESS       = 1 / sum_i w̄_i^2 = exp(-logsumexp_i 2 log w̄_i)    (Kong 1992)
    log Ẑ     = logsumexp_i log w_i - log N                   (log mean exp: the evidence increment)

The max is subtracted before exponentiating (``torch.logsumexp`` does so). A row whose weights are
all -inf has no normalisation; it is flagged in ``degenerate`` and its outputs are -inf / 0, never
NaN. ``normalize`` raises :class:`~posterior.errors.DegenerateWeightsError` for such rows.
"""

from __future__ import annotations

import math
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

    Parameters
    ----------
    log_weights : Tensor (..., N)
        Unnormalised log-weights; -inf allowed, NaN and +inf are not (checked by ``normalize``).
    """
    if log_weights.shape[-1] == 0:
        raise ValueError("log_weights has no particles (last dimension is 0)")
    lw = log_weights.float() if log_weights.dtype in (torch.float16, torch.bfloat16) else log_weights
    n = lw.shape[-1]
    lse = torch.logsumexp(lw, dim=-1)  # (...,)
    degenerate = torch.isneginf(lse)
    safe_lse = torch.where(degenerate, torch.zeros_like(lse), lse)
    normed = lw - safe_lse.unsqueeze(-1)  # (..., N); all -inf on degenerate rows
    ess = torch.exp(-torch.logsumexp(2.0 * normed, dim=-1))  # exp(+inf)=inf on degenerate rows
    ess = torch.where(degenerate, torch.zeros_like(ess), ess)
    return WeightStats(normed, ess, lse - math.log(n), degenerate)


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
    """Raise ``ValueError`` naming the first NaN or +inf entry."""
    bad = torch.isnan(log_weights) | torch.isposinf(log_weights)
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{what} has a non-finite value {log_weights[idx].item()} at index {idx}")
