"""Training objectives for a twist psi_t towards the optimal twist, as pure losses of tensors.

The target: pi*(x) ∝ pi0(x) exp(r(x)/beta) over continuations that end at EOS or after T tokens.
Twisted SMC's intermediate target after t tokens is, over the *state at t* — the live prefix x_1:t
when the sequence is longer than t, else the ended sequence x (length L <= t) —

    pi^psi_t(state) ∝ pi0(x_1:t) exp(psi_t(x_1:t)/beta)   (live),    pi0(x) exp(r(x)/beta)   (ended),

and the optimal twist psi*_t(x_1:t) = beta log E_pi0[exp(r/beta) | x_1:t] makes pi^psi_t the
marginal pi*_t of pi* on states at t: pi*_t(x_1:t) = sum_{x ⊒ x_1:t} pi0(x) e^{r(x)/beta} / Z
= pi0(x_1:t) e^{psi*_t(x_1:t)/beta} / Z. Batches are (P, N, T): prompts, samples, positions
t = 1..T (position i holds psi of x_1:i+1); ``live`` (P, N, T) marks positions with t < L (at t = L
the sequence has ended and the reward, not the twist, is used).

* ``ctl``, contrastive twist learning (Zhao, Brekelmans, Makhzani & Grosse 2024, "Probabilistic
  inference in language models via twisted SMC", Sec. 4.1): minimise sum_t KL(pi*_t || pi^psi_t).
  Since log pi^psi_t = log pi0 + psi_t/beta - log Z_t(psi) on live states,

      grad_psi KL(pi*_t || pi^psi_t) = -E_{pi*_t}[grad psi_t / beta] + E_{pi^psi_t}[grad psi_t / beta],

  (ended states carry no psi, so no gradient, but they take part in the normaliser Z_t(psi)).
  Positives: weighted samples of pi* (full sequences; their states at t are their truncations);
  negatives: per-t weighted samples of pi^psi_t — in ``pst.train.fit`` the particles of one SMC
  run with the current twist after each step t (that step's target is pi^psi_t), or prior
  rollouts re-weighted (below). The surrogate

      loss = (1/beta) mean_p sum_t [ sum_m w̄neg_{m,t} psi_t(x^m) live − sum_n w̄pos_n psi_t(x^n) live ]

  with detached weights has that gradient in expectation (up to self-normalisation bias). Minimiser:
  pi^psi_t = pi*_t for every t, i.e. psi_t = psi*_t on every live prefix of positive mass — exactly,
  as long as some state at t has ended (its fixed potential pins the normaliser); at a t where no
  sequence can have ended, psi_t is identified only up to a constant, which changes nothing in SMC
  (a constant shared by every particle at t cancels in the weights and telescopes out of log Ẑ).
  Self-normalised weights make each step's estimate biased by O(1/ESS), so the stochastic fixed
  point sits near, not at, psi* (measured on the tests' toy at 64 samples per step: errors up to
  0.3, mostly below psi*; the regression objective has no such bias).
  ``ctl_negative_log_weights`` gives the negatives' weights for prior rollouts: a rollout
  x ~ pi0 truncated at t is a draw of pi0's marginal on states at t, so self-normalised weights
  exp(psi_t/beta) (live) / exp(r/beta) (ended) make them samples of pi^psi_t.

* ``regression``: least squares in the exp domain on prior rollouts, shifted by the current value.
  For a rollout x ~ pi0 and a live position t, with psī = psi_t(x_1:t) detached,

      loss = mean_{p,n} sum_t live · ½ (exp((psi_t − psī)/beta) − exp((r(x) − psī)/beta))².

  Fixed point: the expected gradient at a prefix is (1/beta) E_pi0[e^{(psi−psī)/beta}
  (e^{(psi−psī)/beta} − e^{(r−psī)/beta}) | x_1:t], at psi = psī equal to
  (1/beta)(1 − E_pi0[e^{r/beta} | x_1:t] e^{−psi/beta}), which vanishes exactly at
  psi = beta log E_pi0[e^{r/beta} | x_1:t] = psi*_t (and is negative below, positive above it, so
  gradient descent moves towards it). This is plain least squares of e^{psi/beta} to e^{r/beta}
  (whose minimiser is the conditional mean E_pi0[e^{r/beta} | x_1:t]) re-weighted by
  e^{−2psī/beta}, a function of the prefix alone: such a weight never moves a per-prefix
  minimiser, and it keeps the exponentials in range. (A shift c shared by a batch but drawn from
  its rewards would not be safe: it re-weights whole batches by their own rewards and biases the
  stochastic fixed point.)

* ``fudge``: plain least squares of psi_t to r on prior rollouts (FUDGE, Yang & Klein 2021;
  controlled decoding, Mudgal et al. 2024). Its minimiser is E_pi0[r | x_1:t], which is NOT psi*
  (by Jensen, beta log E[e^{r/beta}] >= E[r], with equality only as beta -> inf or when r is
  determined by the prefix). Offered as the baseline those methods use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from posterior.train import objective_names


class TwistLossInfo(NamedTuple):
    """What a twist loss computed besides its value (detached)."""

    positions: torch.Tensor  # () number of live positions that entered the loss
    residual: torch.Tensor  # () mean over live positions of the objective's per-position signal


def live_positions(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(P, N, T) bool: position i (the prefix x_1:i+1) is live, i.e. i + 1 < length."""
    return torch.arange(T, device=lengths.device) + 1 < lengths[..., None]


def _check_beta(beta) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_psi(name: str, psi: torch.Tensor, live: torch.Tensor) -> None:
    if psi.dim() != 3 or live.shape != psi.shape:
        raise ValueError(f"{name} and its live mask must share a (P, N, T) shape; got {tuple(psi.shape)}, {tuple(live.shape)}")
    bad = live & ~torch.isfinite(psi.detach())
    if bool(bad.any()):
        raise ValueError(f"{name} is not finite at live position {tuple(torch.nonzero(bad)[0].tolist())}")


def _normalise(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    """Normalised weights along ``dim``; a slice with every weight 0 (every log-weight -inf: no
    sample of positive mass) gets weights 0, i.e. contributes no gradient."""
    lse = torch.logsumexp(log_w, dim, keepdim=True)
    empty = torch.isneginf(lse)
    return torch.where(empty, 0.0, torch.exp(log_w - torch.where(empty, 0.0, lse)))


def ctl_negative_log_weights(psi: torch.Tensor, live: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Unnormalised log-weights (P, M, T) that make prior rollouts samples of pi^psi_t at each t.

    Parameters
    ----------
    psi : Tensor (P, M, T), psi_t of each rollout's prefixes (detached)
    live : BoolTensor (P, M, T), :func:`live_positions`
    rewards : Tensor (P, M), r of each (ended) rollout
    beta : float > 0

    Returns
    -------
    Tensor (P, M, T) float64: psi_t/beta where live, r/beta where the rollout has ended by t.
    """
    _check_beta(beta)
    _check_psi("psi", psi, live)
    return torch.where(live, psi.detach().double() / beta, rewards.double()[..., None].expand_as(psi) / beta)


def ctl_loss(
    psi_pos: torch.Tensor,
    live_pos: torch.Tensor,
    log_w_pos: torch.Tensor,
    psi_neg: torch.Tensor,
    live_neg: torch.Tensor,
    log_w_neg: torch.Tensor,
    beta: float,
):
    """Contrastive twist learning; the gradient estimates grad sum_t KL(pi*_t || pi^psi_t).

    Parameters
    ----------
    psi_pos : Tensor (P, N, T) with the graph: psi_t of positives (samples of pi*)
    live_pos : BoolTensor (P, N, T)
    log_w_pos : Tensor (P, N): the positives' log-weights (normalised or not; normalised over N here)
    psi_neg : Tensor (P, M, T) with the graph: psi_t of negatives
    live_neg : BoolTensor (P, M, T)
    log_w_neg : Tensor (P, M, T): the negatives' log-weights as samples of pi^psi_t, for each t
        over all M states at t (live or ended), e.g. :func:`ctl_negative_log_weights`
    beta : float > 0

    Returns
    -------
    (loss, TwistLossInfo)
        ``residual`` is the mean over t of the (positive − negative) weighted psi/beta, the
        estimated -grad along a constant shift.
    """
    _check_beta(beta)
    _check_psi("psi_pos", psi_pos, live_pos)
    _check_psi("psi_neg", psi_neg, live_neg)
    P, N, T = psi_pos.shape
    if log_w_pos.shape != (P, N):
        raise ValueError(f"log_w_pos must be (P, N) = {(P, N)}, got {tuple(log_w_pos.shape)}")
    if log_w_neg.shape != psi_neg.shape or psi_neg.shape[0] != P:
        raise ValueError(f"log_w_neg must match psi_neg's (P, M, T) = {tuple(psi_neg.shape)}, got {tuple(log_w_neg.shape)}")
    w_pos = _normalise(log_w_pos.detach().double(), 1)[..., None]  # (P, N, 1)
    w_neg = _normalise(log_w_neg.detach().double(), 1)  # (P, M, T')
    zero = torch.zeros((), dtype=torch.float64, device=psi_pos.device)
    pos = torch.where(live_pos, w_pos * psi_pos.double(), zero).sum((1, 2))  # (P,) sum_t E_pos[psi_t]
    neg = torch.where(live_neg, w_neg * psi_neg.double(), zero).sum((1, 2))  # (P,) sum_t E_neg[psi_t]
    loss = (neg - pos).mean() / beta
    positions = live_pos.sum() + live_neg.sum()
    return loss, TwistLossInfo(positions.detach(), (pos - neg).detach().mean() / beta / max(T, 1))


def regression_loss(psi: torch.Tensor, live: torch.Tensor, rewards: torch.Tensor, beta: float):
    """Exp-domain least squares, shifted by the current value (module docstring): fixed point psi*.

    Parameters
    ----------
    psi : Tensor (P, N, T) with the graph, psi_t of prior rollouts' prefixes
    live : BoolTensor (P, N, T)
    rewards : Tensor (P, N), r of the rollouts (-inf allowed: exp(-inf) = 0)
    beta : float > 0

    Returns
    -------
    (loss, TwistLossInfo)
        ``residual``: mean over live positions of 1 − exp((r − psi)/beta), whose expectation given
        a prefix is 0 exactly at psi*.
    """
    _check_beta(beta)
    _check_psi("psi", psi, live)
    P, N, T = psi.shape
    if rewards.shape != (P, N):
        raise ValueError(f"rewards must be (P, N) = {(P, N)}, got {tuple(rewards.shape)}")
    if bool(torch.isnan(rewards).any() | torch.isposinf(rewards).any()):
        raise ValueError("rewards have NaN or +inf")
    psi = psi.double()
    bar = psi.detach()
    gap = (rewards.double()[..., None] - bar) / beta  # (P, N, T)
    target = torch.exp(torch.where(live, gap, -torch.inf))  # e^{(r − psī)/beta}, 0 off live positions
    if not bool(torch.isfinite(target).all()):
        raise ValueError(f"exp((r - psi)/beta) overflows float64 (max (r - psi)/beta = {float(gap[live].max()):.4g}); "
                         "initialise psi nearer the rewards or raise beta")  # fmt: skip
    fit = torch.exp(torch.where(live, (psi - bar) / beta, -torch.inf))  # 1 at live positions, with the graph
    loss = (0.5 * (fit - target) ** 2).sum() / (P * N)
    n = live.sum()
    return loss, TwistLossInfo(n.detach(), ((1 - target) * live).sum().detach() / n.clamp(min=1))


def fudge_loss(psi: torch.Tensor, live: torch.Tensor, rewards: torch.Tensor, beta: float):
    """Least squares of psi_t to r (FUDGE): minimiser E_pi0[r | x_1:t], not psi* (module docstring).
    Rewards must be finite. Same arguments as :func:`regression_loss` (``beta`` only validated)."""
    _check_beta(beta)
    _check_psi("psi", psi, live)
    P, N, T = psi.shape
    if rewards.shape != (P, N):
        raise ValueError(f"rewards must be (P, N) = {(P, N)}, got {tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("fudge needs finite rewards (least squares to r); use regression or ctl with hard constraints")
    resid = torch.where(live, psi.double() - rewards.double()[..., None], 0.0)  # (P, N, T)
    n = live.sum()
    return (0.5 * resid**2).sum() / (P * N), TwistLossInfo(n.detach(), resid.detach().sum() / n.clamp(min=1))


class TwistObjective(NamedTuple):
    name: str
    loss: Callable
    optimum: str  # what the minimiser is, for docs and errors


_LOSSES = {"ctl": (ctl_loss, "psi*"), "regression": (regression_loss, "psi*"),
           "fudge": (fudge_loss, "E_pi0[r | x_1:t] (not psi*)")}  # fmt: skip
TWIST_OBJECTIVES: dict[str, TwistObjective] = {name: TwistObjective(name, *_LOSSES[name]) for name in objective_names.TWIST_OBJECTIVES}


def get_twist_objective(name: str) -> TwistObjective:
    if name not in TWIST_OBJECTIVES:
        raise ValueError(f"unknown twist objective {name!r}; choose one of {sorted(TWIST_OBJECTIVES)}")
    return TWIST_OBJECTIVES[name]


__all__ = [
    "TWIST_OBJECTIVES", "TwistLossInfo", "TwistObjective", "ctl_loss", "ctl_negative_log_weights", "fudge_loss",
    "get_twist_objective", "live_positions", "regression_loss",
]
