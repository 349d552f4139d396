"""Training objectives for a policy q towards pi*(x) = pi0(x) exp(r(x)/beta) / Z, as pure losses.

Every on-policy loss takes a batch of N samples x_n ~ q per prompt (tensors (P, N), batch first,
samples last) and returns a surrogate ``-mean_n c_n log q(x_n)`` whose gradient is a REINFORCE
estimate; the coefficients c (detached) are each objective's pseudo-reward minus a baseline:

* ``reverse_kl`` (alias ``rl``), KL-regularised RL: maximise E_q[r] - beta KL(q || pi0)
  = beta (log Z - KL(q || pi*)), with per-sequence reward R = r - beta (log q - log pi0) and the
  leave-one-out baseline (RLOO; Kool et al. 2019, Ahmadian et al. 2024). Its optimum is pi*
  (Korbak, Perez & Buckley 2022): at q = pi*, R = beta log Z for every x and every c is 0.
* ``forward_kl`` (alias ``dpg``), distributional policy gradient (Parshakova et al. 2019; Khalifa
  et al. 2021): minimise KL(pi* || q), gradient -E_q[(pi*/q) grad log q]. Weights
  w = pi0 exp(r/beta) / q are normalised per prompt and batch (w̄, summing to 1), c = N w̄ - 1
  (baseline 1 = E_q[pi*/q]). Given ``log_Z`` instead, c = pi*/q - 1 with pi* = pi0 e^{r/beta}/Z:
  unbiased for the exact gradient when log Z is exact.
* ``js``, ``tv``: f-DPG (Go et al. 2023, "Aligning language models with preferences through
  f-divergence minimization"). For D_f(q || pi*) = E_pi*[f(q/pi*)] the gradient is
  E_q[f'(q/pi*) grad log q], i.e. pseudo-reward -f'(t) with t = q/pi* = exp(u),
  u = log q - log pi0 - r/beta + log Z. Jensen–Shannon, f(t) = ½[t log(2t/(1+t)) + log(2/(1+t))]:
  -f'(t) = ½ log((1+t)/(2t)) = ½ (softplus(-u) - log 2). Total variation, f(t) = ½|t - 1|:
  -f'(t) = ½ sign(1 - t) = -½ sign(u). Both need log Z (the training loop passes a running
  importance-sampling estimate) and use the RLOO baseline. Forward KL is f(t) = -log t
  (-f'(t) = 1/t = pi*/q); reverse KL is f(t) = t log t (-f'(t) = -u - 1: RL's reward over beta).
* ``reward``: plain policy gradient on r with RLOO and no KL term. Its optimum puts all mass on
  the reward's argmax: the collapse KL regularisation prevents.
* ``distill``: maximum likelihood on weighted samples of pi* (from SMC or IS):
  -sum_n w̄_n log q(x_n), the forward KL up to a constant (its gradient is unbiased only as the
  sample size grows, as self-normalised IS is).

Hard constraints (r = -inf) give pi*(x) = 0: forward_kl / js / tv / distill handle them (weight 0,
t = inf), while reverse_kl and reward raise (KL(q || pi*) is infinite while q covers such x).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from posterior.train.objective_names import ALIASES, POLICY_OBJECTIVES, policy_objective
from posterior.validate import check_real


class LossInfo(NamedTuple):
    """What a loss computed besides its value (all detached)."""

    pseudo_reward: torch.Tensor  # (P, N) float64, the objective's per-sample signal
    coefficient: torch.Tensor  # (P, N) float64, c in the surrogate -mean c log q (after the baseline)


def _check(log_q: torch.Tensor, log_pi0: torch.Tensor, rewards: torch.Tensor, beta: float) -> None:
    if log_q.dim() != 2 or log_pi0.shape != log_q.shape or rewards.shape != log_q.shape:
        raise ValueError(
            f"log_q, log_pi0 and rewards must share a (P, N) shape; got {tuple(log_q.shape)}, "
            f"{tuple(log_pi0.shape)}, {tuple(rewards.shape)}"
        )
    check_real("beta", beta, positive=True)
    for name, x in (("log_q", log_q), ("log_pi0", log_pi0), ("rewards", rewards)):
        if bool(torch.isnan(x).any() | torch.isposinf(x).any()):
            raise ValueError(f"{name} has NaN or +inf at {tuple(torch.nonzero(torch.isnan(x) | torch.isposinf(x))[0].tolist())}")
    if bool(torch.isneginf(log_q).any()):
        raise ValueError("log_q is -inf for a sample the policy drew")


def leave_one_out(values: torch.Tensor) -> torch.Tensor:
    """values (P, N) minus the mean of the other N - 1 values of the same prompt (RLOO)."""
    N = values.shape[-1]
    if N < 2:
        raise ValueError(f"the leave-one-out baseline needs at least 2 samples per prompt, got {N}")
    return values - (values.sum(-1, keepdim=True) - values) / (N - 1)


def surrogate(log_q: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """-mean over prompts and samples of c · log q: its gradient is -mean c grad log q."""
    return -(coefficient.detach() * log_q.double()).mean()


def log_target(log_pi0: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Unnormalised log pi*(x) = log pi0(x) + r(x)/beta, float64."""
    return log_pi0.double() + rewards.double() / beta


def _finite_or_raise(R: torch.Tensor, what: str) -> None:
    if bool(torch.isneginf(R).any()):
        p, n = torch.nonzero(torch.isneginf(R))[0].tolist()
        raise ValueError(
            f"{what}: sample {n} of prompt {p} has reward or log pi0 -inf (a hard constraint): KL(q || pi*) is "
            "infinite; use forward_kl, js, tv or distill, which give such samples weight 0"
        )


def reverse_kl_loss(log_q, log_pi0, rewards, beta, *, log_Z=None):
    """KL-regularised RL with RLOO: R = r - beta (log q - log pi0); c = R - mean of the others.

    Parameters
    ----------
    log_q : Tensor (P, N) with the graph, log q(x_n) of samples x_n ~ q
    log_pi0 : Tensor (P, N), log pi0(x_n)
    rewards : Tensor (P, N), r(x_n)
    beta : float > 0
    log_Z : ignored (accepted so every on-policy loss takes the same arguments)

    Returns
    -------
    (loss, LossInfo)
        ``loss`` is a scalar whose gradient estimates beta · grad KL(q || pi*).
    """
    _check(log_q, log_pi0, rewards, beta)
    R = rewards.double() - beta * (log_q.detach().double() - log_pi0.double())  # (P, N)
    _finite_or_raise(R, "reverse_kl")
    c = leave_one_out(R)
    return surrogate(log_q, c), LossInfo(R, c)


def reward_loss(log_q, log_pi0, rewards, beta, *, log_Z=None):
    """Policy gradient on r alone with RLOO (no KL): the baseline that collapses onto argmax r."""
    _check(log_q, log_pi0, rewards, beta)
    R = rewards.double()
    _finite_or_raise(R, "reward")
    c = leave_one_out(R)
    return surrogate(log_q, c), LossInfo(R, c)


def _log_ratio(log_q, log_pi0, rewards, beta, log_Z) -> torch.Tensor:
    """u = log q - log pi* = log q - log pi0 - r/beta + log Z, (P, N) float64 (+inf where pi* = 0)."""
    log_Z = torch.as_tensor(log_Z, dtype=torch.float64, device=log_q.device)
    if log_Z.dim() == 0:
        log_Z = log_Z.expand(log_q.shape[0])
    if log_Z.shape != (log_q.shape[0],) or not bool(torch.isfinite(log_Z).all()):
        raise ValueError(f"log_Z must be finite, a scalar or one per prompt ({log_q.shape[0]}); got {log_Z.tolist()}")
    return log_q.detach().double() - log_target(log_pi0, rewards, beta) + log_Z[:, None]


def forward_kl_loss(log_q, log_pi0, rewards, beta, *, log_Z=None):
    """DPG: c = N w̄ - 1 with w̄ the per-prompt normalised weights pi0 e^{r/beta} / q, or, given
    ``log_Z`` (scalar or (P,)), c = pi*/q - 1. The gradient estimates grad KL(pi* || q).

    A prompt whose N samples all have weight 0 (every reward -inf) has no self-normalised
    estimate: its coefficients are 0 (no gradient); the training loop counts such prompts in its
    ``zero_weight_prompts`` metric."""
    _check(log_q, log_pi0, rewards, beta)
    log_w = log_target(log_pi0, rewards, beta) - log_q.detach().double()  # (P, N)
    if log_Z is None:
        lse = torch.logsumexp(log_w, -1, keepdim=True)  # (P, 1)
        empty = torch.isneginf(lse)  # (P, 1) no sample with positive weight: no estimate of pi*/q
        rho = log_w.shape[-1] * torch.exp(log_w - torch.where(empty, 0.0, lse))  # (P, N): N w̄
        rho = torch.where(empty, 1.0, rho)  # such a prompt contributes c = 0 (no gradient)
    else:
        rho = torch.exp(-_log_ratio(log_q, log_pi0, rewards, beta, log_Z))  # pi*/q
    c = rho - 1.0
    return surrogate(log_q, c), LossInfo(rho, c)


def _f_dpg(pseudo: Callable[[torch.Tensor], torch.Tensor], log_q, log_pi0, rewards, beta, log_Z):
    _check(log_q, log_pi0, rewards, beta)
    if log_Z is None:
        raise ValueError("f-DPG needs log_Z (scalar or one per prompt): the ratio q/pi* depends on it")
    R = pseudo(_log_ratio(log_q, log_pi0, rewards, beta, log_Z))  # (P, N)
    c = leave_one_out(R)
    return surrogate(log_q, c), LossInfo(R, c)


def _js_pseudo_reward(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-u) - math.log(2.0))  # finite at u = +inf (pi* = 0): -½ log 2


def _tv_pseudo_reward(u: torch.Tensor) -> torch.Tensor:
    return -0.5 * torch.sign(u)


def js_loss(log_q, log_pi0, rewards, beta, *, log_Z=None):
    """f-DPG for Jensen–Shannon: pseudo-reward ½ log((1 + t) / (2t)), t = q/pi*; RLOO baseline."""
    return _f_dpg(_js_pseudo_reward, log_q, log_pi0, rewards, beta, log_Z)


def tv_loss(log_q, log_pi0, rewards, beta, *, log_Z=None):
    """f-DPG for total variation: pseudo-reward ½ sign(1 - q/pi*); RLOO baseline."""
    return _f_dpg(_tv_pseudo_reward, log_q, log_pi0, rewards, beta, log_Z)


def distill_loss(log_q: torch.Tensor, log_weights: torch.Tensor):
    """Weighted maximum likelihood: -mean over prompts of sum_n w̄_n log q(x_n).

    Parameters
    ----------
    log_q : Tensor (P, N) with the graph, log q of samples of pi*
    log_weights : Tensor (P, N), their normalised log-weights (logsumexp over N == 0; uniform
        after resampling)
    """
    if log_q.dim() != 2 or log_weights.shape != log_q.shape:
        raise ValueError(f"log_q and log_weights must share a (P, N) shape; got {tuple(log_q.shape)}, {tuple(log_weights.shape)}")
    w = log_weights.detach().double().exp()  # (P, N)
    if not torch.allclose(w.sum(-1), torch.ones(w.shape[0], dtype=torch.float64), atol=1e-4):
        raise ValueError(f"log_weights must be normalised per prompt; their sums are {w.sum(-1).tolist()}")
    # 0 · log q where a weight is 0, even if log q is -inf there
    lq = torch.where(w > 0, log_q.double(), torch.zeros((), dtype=torch.float64))
    c = w * w.shape[-1]  # so that loss = surrogate(log_q, c) = -mean_p sum_n w̄ log q
    return -(w * lq).sum(-1).mean(), LossInfo(c, c)


class Objective(NamedTuple):
    name: str
    loss: Callable
    on_policy: bool  # samples from q (True) or from the posterior (distill)
    uses_log_Z: bool  # takes the loop's running log Z estimate


_LOSSES = {"reverse_kl": reverse_kl_loss, "forward_kl": forward_kl_loss, "js": js_loss, "tv": tv_loss,
           "reward": reward_loss, "distill": distill_loss}  # fmt: skip
OBJECTIVES: dict[str, Objective] = {name: Objective(name, _LOSSES[name], *kind) for name, kind in POLICY_OBJECTIVES.items()}


def get_objective(name: str) -> Objective:
    return OBJECTIVES[policy_objective(name)]


__all__ = [
    "ALIASES", "OBJECTIVES", "LossInfo", "Objective", "distill_loss", "forward_kl_loss", "get_objective", "js_loss",
    "leave_one_out", "reverse_kl_loss", "reward_loss", "surrogate", "tv_loss",
]
