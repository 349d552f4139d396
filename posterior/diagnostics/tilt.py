"""The tilt r/beta in float64 without losing digits: weights from reward differences.

Importance log-weights of pi*(x) ∝ pi0(x) exp(r(x)/beta) against a proposal q are
log w_i = r_i/beta + b_i with b_i = log pi0(x_i) - log q(x_i). When |r/beta| is large (rewards
~1e6 at beta 1e-3, or beta ~1e-17) forming r_i/beta first rounds away everything below its last
digit: b_i, log N, and the differences between rewards. So with c = the largest finite reward of
the row, weights are formed from differences,

    log w_i = c/beta + l_i,        l_i = (r_i - c)/beta + b_i,

and c/beta is added only where an absolute number is reported (log Z). The l_i are exact to
float64 rounding at any beta; so are the normalised weights, the ESS and

    KL̂(pi* || pi0) = sum_i w̄_i r_i/beta - log Ẑ = sum_i w̄_i (r_i - c)/beta - (log Ẑ - c/beta),

whose two terms are each small (for the prior as proposal it is log N - H(w̄) in [0, log N]; a
constant reward gives exactly 0). When c/beta itself is not a finite float64, log Z cannot be
represented and :func:`scaled` raises a ``ValueError`` naming the overflow.

Samplers that form log pi0 + r/beta in absolute terms (SMC's running weights, MH's acceptance
ratios) are exact only while float64 resolves the sum finely: :func:`check_resolution` raises
when |r/beta| exceeds :data:`RESOLUTION_LIMIT` (2^32, where float64 steps reach ~1e-6 nats).
"""

from __future__ import annotations

import math

import torch

#: Largest |r/beta| (and |log Z|) at which float64 still resolves 2^-20 ≈ 1e-6 nats.
RESOLUTION_LIMIT = 2.0**32


def reward_shift(rewards: torch.Tensor) -> torch.Tensor:
    """(...,) float64 the largest finite reward of each row (0 where none is finite).

    Parameters
    ----------
    rewards : Tensor (..., N)
    """
    r = rewards.double()
    finite = torch.isfinite(r)
    best = torch.where(finite, r, -math.inf).amax(-1)  # (...,)
    return torch.where(finite.any(-1), best, torch.zeros_like(best))


def scaled(shift: torch.Tensor, beta: float, *, what: str = "reward") -> torch.Tensor:
    """shift/beta as float64, raising ``ValueError`` where a finite shift overflows float64.

    Parameters
    ----------
    shift : Tensor (...,)
        Finite rewards (e.g. :func:`reward_shift`).
    beta : float > 0
    """
    out = shift.double() / beta
    bad = ~torch.isfinite(out) & torch.isfinite(shift)
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        v = float(shift[idx])
        raise ValueError(
            f"r/beta overflows float64 for {what} {v!r} at beta={beta!r}: |r/beta| > {torch.finfo(torch.float64).max:.3g}, "
            "so log Z is not representable; use a larger beta or rescale the reward"
        )
    return out


def relative_log_weights(
    rewards: torch.Tensor, beta: float, shift: torch.Tensor, log_ratio: torch.Tensor | None = None
) -> torch.Tensor:
    """l_i = (r_i - c)/beta + b_i, float64 (..., N); -inf where r_i = -inf or b_i = -inf.

    Parameters
    ----------
    rewards : Tensor (..., N)
    beta : float > 0
    shift : Tensor (...,)
        c, one per row (:func:`reward_shift`).
    log_ratio : Tensor (..., N), optional
        b_i = log pi0(x_i) - log q(x_i); None for the prior as proposal (b = 0).
    """
    tilt = (rewards.double() - shift.double().unsqueeze(-1)) / beta  # (..., N) <= 0 at the max
    if log_ratio is None:
        return tilt
    return tilt + log_ratio.double()


def kl_estimate(log_weights: torch.Tensor, rewards: torch.Tensor, beta: float, shift: torch.Tensor, log_mean: torch.Tensor) -> torch.Tensor:
    """(...,) float64 KL̂(pi* || pi0) = sum_i w̄_i (r_i - c)/beta - (log Ẑ - c/beta).

    Parameters
    ----------
    log_weights : Tensor (..., N)
        Normalised log-weights w̄ (float64 preferred).
    rewards : Tensor (..., N)
    shift : Tensor (...,)
        c, as used for ``log_mean``.
    log_mean : Tensor (...,)
        log Ẑ - c/beta: the log-mean-exp of the relative log-weights.
    """
    w = log_weights.double().exp()  # (..., N)
    tilt = (rewards.double() - shift.double().unsqueeze(-1)) / beta
    tilt = torch.where(w > 0, tilt, 0.0)  # weight-0 samples (reward -inf) do not contribute
    return (w * tilt).sum(-1) - log_mean.double()


def check_resolution(rewards: torch.Tensor, beta: float, log_Z: torch.Tensor | None, *, method: str) -> None:
    """Raise ``ValueError`` when |r/beta| or |log Z| exceeds :data:`RESOLUTION_LIMIT`: a sampler
    that adds log pi0 to r/beta in float64 would round its weights and log Z by more than 1e-6."""
    r = rewards.double()
    finite = torch.isfinite(r)
    top = float(torch.where(finite, r.abs(), 0.0).amax() / beta) if r.numel() else 0.0
    if log_Z is not None and log_Z.numel():
        top = max(top, float(log_Z.double().abs().amax()))
    if top > RESOLUTION_LIMIT:
        step = math.ulp(top) if math.isfinite(top) else math.inf
        raise ValueError(
            f"r/beta overflows float64 for method {method!r}: |r/beta| reaches {top:.3g}, where float64 resolves "
            f"only steps of {step:.2g} nats (more than 1e-6), so its weights and log Z would be rounded; use "
            f"beta >= {float(torch.where(finite, r.abs(), 0.0).amax()) / RESOLUTION_LIMIT:.3g}, rescale the reward, "
            "or a method that works with reward differences ('is', 'rejection', 'qrs')"
        )
