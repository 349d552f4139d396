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


def reward_on_frontier(points: Sequence[FrontierPoint], x: float) -> float | None:
    """The frontier curve's reward at KL ``x``: linear between ``points`` (sorted by KL), None
    outside their KL range (an estimated frontier ends where its reweighted draws run out, at
    KL <= log N: there is no curve, and so no band, beyond it)."""
    if not points or x < points[0].kl_prior or x > points[-1].kl_prior:
        return None
    for a, b in zip(points, points[1:]):
        if x <= b.kl_prior:
            t = 0.0 if b.kl_prior == a.kl_prior else (x - a.kl_prior) / (b.kl_prior - a.kl_prior)
            return a.reward_mean + t * (b.reward_mean - a.reward_mean)
    return points[-1].reward_mean


def draw_bound_band(ax, points: Sequence[FrontierPoint], beta: float, log_z_upper: float, xs: Sequence[float]) -> list[float]:
    """Draw on matplotlib Axes ``ax`` the bound line reward <= beta·(KL + U) over ``xs`` (it holds
    for every distribution, so it runs across the plot) and the band between it and the frontier
    curve, only where the curve is (between its first and last point). Returns the curve's rewards
    at the points of the band (for the axis limits)."""
    top = [beta * (x + log_z_upper) for x in xs]
    ax.plot(xs, top, ":", color="0.45", label=f"bound line: reward <= {beta:g}·(KL + {log_z_upper:.3g})")
    inside = sorted({x for x in xs if reward_on_frontier(points, x) is not None} | {p.kl_prior for p in points})
    curve = [reward_on_frontier(points, x) for x in inside]
    if len(inside) >= 2:
        ax.fill_between(inside, curve, [beta * (x + log_z_upper) for x in inside], color="0.85", alpha=0.6,
                        label="frontier band (estimate .. bound line), where the estimate exists")  # fmt: skip
    return curve


def error_bar_key(ax, z: float) -> None:
    """A legend entry saying what the error bars are: horizontal, the row's bracket on KL(·‖pi0)
    (each end an estimated bound moved out by z standard errors; best-of-k: [0, its bound]);
    vertical, its mean reward ± z standard errors (where the reward is an estimate)."""
    ax.errorbar([math.nan], [math.nan], xerr=[[1.0], [1.0]], yerr=[[1.0], [1.0]], fmt="none", ecolor="0.3",
                elinewidth=1, capsize=3,
                label=f"error bars: horizontal, KL bracket (ends ±{z:g} SE;\nbest-of-k [0, bound]); vertical, reward ±{z:g} SE")  # fmt: skip


__all__ = ["FrontierPoint", "default_betas", "draw_bound_band", "error_bar_key", "estimated_frontier", "exact_frontier",
           "reward_on_frontier"]
