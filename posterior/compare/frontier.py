"""The optimal reward–KL frontier: the points (KL(pi*_b ‖ pi0), E_pi*_b[r]) over a sweep of b.

For any q, E_q[r] - b KL(q ‖ pi0) <= b log Z_b with equality only at q = pi*_b ∝ pi0 e^{r/b}, so
no distribution beats pi*_b's reward at its KL: the curve over b is the frontier every sampler and
policy is measured against (Korbak, Perez & Buckley 2022; Gao, Schulman & Hilton 2023 plot reward
against KL(·‖pi0) the same way).

* Exact, for enumerable priors (:func:`exact_frontier`): enumerate the support once per prompt;
  for each b, pi*_b = softmax(log pi0 + r/b), E[r] = sum pi*_b r and
  KL = sum pi*_b (log pi*_b - log pi0) = E[r]/b - log Z_b.
* Estimated, for real priors (:func:`estimated_frontier`): reweight one set of prior draws,
  w̄ ∝ e^{r/b}: E[r] ≈ sum w̄ r, KL ≈ sum w̄ r/b - log mean e^{r/b}. As b shrinks the ESS of the
  weights collapses and the estimate with it (KL is at most log N); each point carries its ESS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from posterior.diagnostics.weights import log_weight_stats


class FrontierPoint(NamedTuple):
    beta: float  # inf: the prior itself
    kl_prior: float  # KL(pi*_b ‖ pi0), averaged over prompts
    reward_mean: float  # E_pi*_b[r], averaged over prompts
    ess: float | None  # mean ESS of the reweighted draws (None: exact)
    exact: bool


def default_betas(beta: float, *, points: int = 25, span: float = 64.0) -> list[float]:
    """A geometric grid from beta/span to beta·span (including beta), then inf (the prior)."""
    grid = torch.logspace(math.log10(beta / span), math.log10(beta * span), points, dtype=torch.float64).tolist()
    return sorted(set(grid) | {float(beta)}) + [math.inf]


def _point(log_prior: torch.Tensor, rewards: torch.Tensor, b: float):
    """(E[r], KL) of pi*_b over an enumerated support: log_prior, rewards (S,) float64."""
    if math.isinf(b):
        p = log_prior.exp()
        ok = p > 0
        return float((p[ok] * rewards[ok]).sum()), 0.0
    log_joint = log_prior + rewards / b
    log_post = log_joint - torch.logsumexp(log_joint, 0)
    p = log_post.exp()
    ok = p > 0
    return float((p[ok] * rewards[ok]).sum()), float((p[ok] * (log_post[ok] - log_prior[ok])).sum())


def exact_frontier(prior, reward, max_new_tokens: int, prompts: Sequence[str] | None, betas: Sequence[float]) -> list[FrontierPoint]:
    from posterior.exact import exact_posterior

    supports = []
    for prompt in prompts or [None]:
        ex = exact_posterior(prior, reward, 1.0, max_new_tokens, prompt)  # the support; b is applied below
        supports.append((ex.log_prior, ex.rewards))
    out = []
    for b in betas:
        pts = [_point(lp, r, b) for lp, r in supports]
        out.append(FrontierPoint(float(b), sum(k for _, k in pts) / len(pts), sum(r for r, _ in pts) / len(pts), None, True))
    return out


def estimated_frontier(rewards: torch.Tensor, betas: Sequence[float]) -> list[FrontierPoint]:
    """From rewards (P, N) of prior draws (each prompt's own draws)."""
    r = rewards.double()
    out = []
    for b in betas:
        if math.isinf(b):
            finite = torch.isfinite(r)
            rm = float(torch.where(finite, r, 0.0).sum() / finite.sum()) if bool(finite.any()) else -math.inf
            out.append(FrontierPoint(math.inf, 0.0, rm, float(r.shape[1]), False))
            continue
        stats = log_weight_stats(r / b)  # (P, N): weights e^{r/b} against the prior
        if bool(stats.degenerate.any()):
            continue  # every draw of a prompt at -inf: no estimate at any b
        w = stats.log_weights.exp()
        rm = torch.where(w > 0, w * r, 0.0).sum(-1)  # (P,)
        kl = rm / b - stats.log_mean  # (P,)
        out.append(FrontierPoint(float(b), float(kl.mean()), float(rm.mean()), float(stats.ess.mean()), False))
    return out


__all__ = ["FrontierPoint", "default_betas", "estimated_frontier", "exact_frontier"]
