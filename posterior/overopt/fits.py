"""Gao, Schulman & Hilton (2023), "Scaling laws for reward model overoptimization": the gold reward
gained over the initial policy, as a function of d = sqrt(KL(pi || pi0)), follows

    best-of-n    R(d) = d (alpha - b d)           peak at d* = alpha / (2 b)
    RL           R(d) = d (alpha - b log d)       peak at d* = exp(alpha / b - 1)

(both vanish at d = 0; R is the gold reward minus the initial policy's). Both forms are linear in
(alpha, b), so the least-squares fit is one linear solve (``numpy.linalg.lstsq``) on the design
columns [d, -d^2] or [d, -d log d] (d log d -> 0 at d = 0). A fit with b <= 0 has no peak in
d > 0 (the gold reward still rises at the end of the sweep): the peak is reported as None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

FORMS = ("bon", "rl")


class GaoFit(NamedTuple):
    form: str  # "bon": d (alpha - b d); "rl": d (alpha - b log d)
    alpha: float
    b: float
    d_peak: float | None  # sqrt(KL) where the fitted gold gain peaks (None: no peak, b <= 0)
    kl_peak: float | None  # d_peak ** 2
    gain_peak: float | None  # the fitted gold gain over the prior at the peak
    rmse: float  # root-mean-square residual of the fit
    points: int


def _design(d: np.ndarray, form: str) -> np.ndarray:
    if form == "bon":
        return np.stack([d, -(d**2)], axis=1)
    if form == "rl":
        dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
        return np.stack([d, -dlogd], axis=1)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def gao_curve(d, alpha: float, b: float, form: str) -> np.ndarray:
    """R(d) of the form ``form`` at d = sqrt(KL) (array-like, d >= 0)."""
    arr = np.asarray(d, dtype=np.float64)
    out = _design(arr.reshape(-1), form) @ np.array([alpha, b], dtype=np.float64)
    return out.reshape(arr.shape) if arr.ndim else float(out[0])


def gao_peak(alpha: float, b: float, form: str) -> float | None:
    """d* maximising R(d) over d > 0, or None where R has no maximum there (b <= 0 or alpha <= 0
    for best-of-n)."""
    if not (b > 0):
        return None
    if form == "bon":
        return alpha / (2 * b) if alpha > 0 else None
    if form == "rl":
        x = alpha / b - 1
        return math.exp(x) if x < 700 else None  # beyond float64: no peak within reach
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def fit_gao(d: Sequence[float], gain: Sequence[float], form: str) -> GaoFit:
    """Least-squares (alpha, b) of ``form`` through points (d_i, gain_i), d = sqrt(KL) >= 0 and
    gain = gold reward minus the prior's. Needs two points with d > 0."""
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    g = np.asarray(gain, dtype=np.float64).reshape(-1)
    if d.shape != g.shape:
        raise ValueError(f"d and gain differ in length: {d.shape[0]} and {g.shape[0]}")
    ok = np.isfinite(d) & np.isfinite(g)
    d, g = d[ok], g[ok]
    if (d < 0).any():
        raise ValueError(f"d = sqrt(KL) must be >= 0, got {d[d < 0][0]}")
    if int((d > 0).sum()) < 2:
        raise ValueError(f"fitting the {form!r} form needs at least two points with KL > 0, got {int((d > 0).sum())}")
    X = _design(d, form)
    (alpha, b), *_ = np.linalg.lstsq(X, g, rcond=None)
    alpha, b = float(alpha), float(b)
    rmse = float(np.sqrt(np.mean((X @ np.array([alpha, b]) - g) ** 2)))
    dp = gao_peak(alpha, b, form)
    gp = None if dp is None else float(gao_curve(dp, alpha, b, form))
    return GaoFit(form, alpha, b, dp, None if dp is None else dp * dp, gp, rmse, int(d.shape[0]))


__all__ = ["FORMS", "GaoFit", "fit_gao", "gao_curve", "gao_peak"]
