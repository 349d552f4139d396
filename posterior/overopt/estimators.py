"""Estimates of pi*_beta and of best-of-k from ONE pool of N prior draws per prompt.

Self-normalised importance sampling (prior as proposal), for any beta: w_i ∝ exp(r_i/beta),

    E_pi*[f]        ≈ mu_f = sum_i w̄_i f_i
    KL(pi*||pi0)    ≈ sum_i w̄_i r_i/beta - log (1/N) sum_i w_i

Standard errors by the delta method (first-order Taylor expansion of the ratio of means; e.g.
Owen 2013, "Monte Carlo theory, methods and examples", §9.2): with w̃_i = N w̄_i (mean 1) and the
influence values psi_i, se^2 = sum_i psi_i^2 / N^2, where

    psi_i = w̃_i (f_i - mu_f)                            for the mean of f,
    psi_i = w̃_i (r_i/beta - mu_{r/beta} - 1) + 1        for the KL estimate (A/B - log B, A =
                                                         mean w r/beta, B = mean w).

They are asymptotic (N -> inf at fixed beta) and too small once the ESS collapses (small beta):
each row carries its ESS.

Best-of-k from the same pool, any k <= N - 1: the U-statistic over all k-subsets of the pool
(the unbiased estimator used by Nakano et al. 2021 and Gao et al. 2023). Rank the draws by reward
ascending (ties: the earlier draw ranks higher, as best-of-n keeps the first maximum); the draw of
rank i is the pick of C(i-1, k-1) of the C(N, k) subsets, so

    E_bon_k[f] ≈ sum_i C(i-1, k-1) / C(N, k) · f_(i).

Its standard error is the jackknife's (leave-one-out U-statistics in O(N) from prefix sums). Its
KL(bon_k || pi0) is reported as log k - (k-1)/k: exact when the reward has no atoms, an upper
bound in general (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment
policy"); that is how Gao et al. place best-of-n on the KL axis, and :func:`best_of_for_kl`
inverts it to match a beta's KL.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from posterior.diagnostics.tilt import reward_shift
from posterior.diagnostics.weights import log_weight_stats


class PooledIS(NamedTuple):
    """Per-prompt self-normalised IS estimates at one beta. Shapes (P,) unless noted."""

    means: torch.Tensor  # (K, P) sum_i w̄_i f_i for each of the K value rows
    means_se: torch.Tensor  # (K, P) delta-method standard errors
    kl: torch.Tensor  # KL̂(pi*_beta || pi0)
    kl_se: torch.Tensor  # its delta-method standard error
    ess: torch.Tensor  # 1 / sum w̄^2
    weights: torch.Tensor  # (P, N) the normalised weights w̄


def _weighted(w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """w * f with 0 where w == 0 (f may be -inf there)."""
    return torch.where(w > 0, w * f, torch.zeros_like(w))


def pooled_is(rewards: torch.Tensor, values: torch.Tensor, beta: float) -> PooledIS:
    """SNIS estimates of E_pi*_beta[values] and KL(pi*_beta || pi0) from prior draws.

    Parameters
    ----------
    rewards : Tensor (P, N) float64, the reward that defines pi*_beta (finite or -inf)
    values : Tensor (K, P, N) float64, the functions whose posterior means are wanted
    beta : float > 0
    """
    r = rewards.double()
    P, N = r.shape
    shift = reward_shift(r)  # (P,) weights from reward differences: exact at any r/beta
    stats = log_weight_stats((r - shift[:, None]) / beta)
    if bool(stats.degenerate.any()):
        raise ValueError(f"every pool draw of prompt #{int(stats.degenerate.nonzero()[0])} has reward -inf: no estimate of pi*")
    w = stats.log_weights.exp()  # (P, N) normalised
    wt = N * w  # (P, N) mean 1
    f = values.double()
    mu = _weighted(w[None], f).sum(-1)  # (K, P)
    psi = _weighted(wt[None], f - mu[..., None])  # (K, P, N)
    se = psi.pow(2).sum(-1).sqrt() / N
    rb = (r - shift[:, None]) / beta  # (P, N) r/beta shifted: the shift cancels in the KL
    mu_rb = _weighted(w, rb).sum(-1)  # (P,)
    kl = mu_rb - stats.log_mean  # log_mean = log mean exp((r - shift)/beta)
    psi_kl = _weighted(wt, rb - mu_rb[:, None] - 1.0) + 1.0  # (P, N)
    kl_se = psi_kl.pow(2).sum(-1).sqrt() / N
    return PooledIS(mu, se, kl.clamp_min(0.0), kl_se, stats.ess, w)


def kl_bound(k: int | float) -> float:
    """log k - (k-1)/k: the best-of-k KL(bon_k || pi0) bound (0 at k = 1)."""
    return math.log(k) - (k - 1) / k


def best_of_for_kl(kl: float, *, max_k: int | None = None) -> int:
    """The integer k >= 1 whose :func:`kl_bound` is nearest ``kl`` (it increases in k), capped at
    ``max_k``."""
    if not math.isfinite(kl) or kl < 0:
        raise ValueError(f"kl must be finite and >= 0, got {kl!r}")
    lo, hi = 1.0, 2.0
    while kl_bound(hi) < kl:
        lo, hi = hi, 2 * hi
    for _ in range(200):  # bisection on the real k
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kl_bound(mid) < kl else (lo, mid)
    k0 = max(1, math.floor(lo))
    k = min((k0, k0 + 1), key=lambda j: abs(kl_bound(j) - kl))
    return k if max_k is None else min(k, max_k)


def _log_comb(n: torch.Tensor, r: int) -> torch.Tensor:
    """log C(n, r) elementwise in float64; -inf where n < r."""
    n = n.double()
    ok = n >= r
    safe = torch.where(ok, n, torch.full_like(n, float(r)))
    out = torch.lgamma(safe + 1) - math.lgamma(r + 1) - torch.lgamma(safe - r + 1)
    return torch.where(ok, out, torch.full_like(out, -math.inf))


class PooledBoN(NamedTuple):
    means: torch.Tensor  # (K, P) U-statistic estimates of E_bon_k[f]
    means_se: torch.Tensor  # (K, P) jackknife standard errors
    best_of: int
    weights: torch.Tensor  # (P, N) each draw's share C(rank-1, k-1)/C(N, k) of the U-statistic


def _ranks(rewards: torch.Tensor) -> torch.Tensor:
    """(P, N) order: draws sorted by reward ascending, ties with the earlier draw ranked higher."""
    P, N = rewards.shape
    idx = torch.arange(N, dtype=torch.float64).expand(P, N)
    # lexicographic sort by (reward, -index): a stable sort by -index, then a stable sort by reward
    order = torch.argsort(-idx, dim=-1, stable=True)
    by_r = torch.argsort(rewards.gather(1, order), dim=-1, stable=True)
    return order.gather(1, by_r)


def pooled_best_of(rewards: torch.Tensor, values: torch.Tensor, k: int) -> PooledBoN:
    """U-statistic estimates of E[values] under best-of-k on ``rewards`` (P, N); values (K, P, N)."""
    r = rewards.double()
    P, N = r.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N - 1:
        raise ValueError(f"best_of must be an int in [1, N-1] = [1, {N - 1}] for a pool of N={N} draws, got {k!r}")
    order = _ranks(r)  # (P, N)
    a = values.double().gather(2, order[None].expand(values.shape[0], -1, -1))  # (K, P, N) ascending rank
    i = torch.arange(1, N + 1, dtype=torch.float64)  # ranks 1..N
    coef = (_log_comb(i - 1, k - 1) - _log_comb(torch.tensor(float(N)), k)).exp()  # (N,) sums to 1
    mean = _weighted(coef.expand_as(a), a).sum(-1)  # (K, P)
    # jackknife: removing rank j leaves ranks i < j as they are and moves ranks i > j down by one
    c_lo = (_log_comb(i - 1, k - 1) - _log_comb(torch.tensor(float(N - 1)), k)).exp()  # (N,)
    c_hi = (_log_comb(i - 2, k - 1) - _log_comb(torch.tensor(float(N - 1)), k)).exp()
    lo = _weighted(c_lo.expand_as(a), a).cumsum(-1)  # (K, P, N) sum over ranks <= j
    hi = _weighted(c_hi.expand_as(a), a).flip(-1).cumsum(-1).flip(-1)  # sum over ranks >= j
    zero = torch.zeros_like(lo[..., :1])
    loo = torch.cat([zero, lo[..., :-1]], -1) + torch.cat([hi[..., 1:], zero], -1)  # (K, P, N)
    dev = loo - loo.mean(-1, keepdim=True)
    se = ((N - 1) / N * dev.pow(2).sum(-1)).sqrt()
    weights = torch.zeros(P, N, dtype=torch.float64).scatter_(1, order, coef.expand(P, N).contiguous())
    return PooledBoN(mean, se, k, weights)


def exact_best_of(log_prior: torch.Tensor, rewards: torch.Tensor, k: int) -> torch.Tensor:
    """log P_bon_k(x) over an enumerated support: log_prior, rewards (S,) float64 -> (S,).

    For a reward level c with prior mass p_c and mass F_c below it, best-of-k picks level c with
    probability (F_c + p_c)^k - F_c^k, and within the level each x in proportion to pi0(x)
    (the first of tied maxima is uniform over the tied draws)."""
    lp, r = log_prior.double(), rewards.double()
    levels, inv = torch.unique(r, sorted=True, return_inverse=True)  # -inf first
    p_level = torch.zeros(levels.shape[0], dtype=torch.float64).index_add_(0, inv, lp.exp())
    below = torch.cumsum(p_level, 0) - p_level  # (L,) F_c
    upto = below + p_level
    log_upto = upto.log()
    # (F + p)^k - F^k = (F + p)^k · (1 - (F / (F + p))^k), formed in logs so large k keeps digits
    ratio_k = torch.where(below > 0, k * (below.log() - log_upto), torch.full_like(upto, -math.inf))
    log_level = k * log_upto + torch.log(-torch.expm1(ratio_k))  # (L,)
    return log_level[inv] + lp - p_level.log()[inv]


__all__ = ["PooledBoN", "PooledIS", "best_of_for_kl", "exact_best_of", "kl_bound", "pooled_best_of", "pooled_is"]
