"""Two-sided bounds on log Z and the KLs: bidirectional Monte Carlo.

Every unbiased estimator Ẑ of Z = sum_x pi0(x) exp(r(x)/beta) (IS, SMC) gives, by Jensen,

    E[log Ẑ] <= log Z                                                      (the lower side)

and the same estimator run *conditionally* on one exact sample x* ~ pi* gives the upper side
(Grosse, Ghahramani & Adams 2015, "Sandwiching the marginal likelihood using bidirectional Monte
Carlo"; Zhao, Brekelmans, Makhzani & Grosse 2024 for twisted SMC over language models):

    E[1/Ẑ_cond] = 1/Z   so   E[log Ẑ_cond] >= log Z.                       (the upper side)

For importance sampling with proposal q the conditional run is the n-draw estimator with one draw
replaced by x*: Ẑ_cond = (1/n) sum_i w(x_i), x_1 = x* ~ pi*, x_2..n ~ q, w = pi0 e^{r/beta}/q. Since
pi*(x_1) = w(x_1) q(x_1) / Z and Ẑ is symmetric in its draws,

    E[1/Ẑ_cond] = E_{q^n}[ w(x_1) / (Z Ẑ) ] = (1/Z) E_{q^n}[ (1/n) sum_i w(x_i) / Ẑ ] = 1/Z.

For SMC it is conditional SMC (particle Gibbs' kernel) with x* as the retained reference particle.
Both sides are means over ``repeats`` independent runs, reported with their standard errors; the
gap between them shrinks as n grows and is ~0 when the proposal is pi* itself.

Brackets on the KLs follow from log pi*(x) = log pi0(x) + r(x)/beta - log Z:

    KL(pi*||pi0) = E_pi*[r]/beta - log Z                   in [m/beta - U, m/beta - L]
    KL(q||pi*)   = E_q[log q - log pi0 - r/beta] + log Z    in [a + L, a + U]
    KL(pi*||q)   = E_pi*[log pi0 + r/beta - log q] - log Z  in [b - U, b - L]

with L, U the two sides, m and b means over the exact samples and a a mean over q's own draws.
Each side is an estimate of a bound, not a bound, so every bracket end — log Z's own
(``log_Z_lower``, ``log_Z_upper``) as the KLs' — is moved outwards by ``z`` standard errors of
what it is made of (default 3): the bracket then holds the exact value unless an estimate is more
than z standard errors off. The plain means are kept as ``log_Z_lower_mean`` / ``log_Z_upper_mean``
(they miss log Z about half the time when the sides are close: they are estimates, not ends). A
low end below 0 is raised to 0 (a KL is never negative). A standard error from K repeats is itself
noisy: mean ± z·SE covers its expectation with the Student-t probability of K-1 degrees of freedom
(``coverage``, per end: 0.898 at K = 2 and z = 3, against 0.9987 for a normal), and a result whose
coverage is below ``RELIABLE_COVERAGE`` says it is not reliable.

Hard constraints: one run of IS or SMC may lose every sample (Ẑ = 0). That is a legitimate draw
of the unbiased estimator, and it is kept: the mean of log Ẑ over the repeats is then -inf, so
the lower side of log Z is -inf (still a true bound) and the KL ends that rest on it are 0 or
+inf, never NaN; ``degenerate_repeats`` counts such runs per prompt and the notes say what helps
(more particles, or the tilted proposal with a twist towards the constraint). Dropping those runs
would bias the lower side upwards, past log Z. The upper side's runs hold an exact sample, which
has positive weight, so they never lose every sample.

Exact samples come from rejection sampling with the reward's upper bound R (``Reward.upper_bound``:
1 for Sentiment, 0 for constraints): it costs about exp(R/beta)/Z prior draws per sample, which is
reported. Where no bound is known and no ``exact_samples`` are given, only the lower side exists
and the result says so.

Numerics: brackets are formed relative to a reference reward c per prompt (log Z - c/beta), so
they stay exact wherever the samplers' own log Ẑ does; beyond |c/beta| = 1e12 float64 cannot
resolve the subtraction and ``bounds`` refuses.

This module holds the numerics and the result (:class:`Bounds`); the runner that draws the samples,
:func:`posterior.bounds.bounds` (``pst.bounds``), sits above the samplers, which it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_SCALE = 1e12  # |c/beta| beyond which log Z - c/beta cannot be resolved in float64
RELIABLE_COVERAGE = 0.975  # per-end Student-t coverage of mean ± z·SE below which a result says it is not reliable


def mean_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the mean over the last axis (float64; se 0 with one value).

    A row holding ±inf (a run whose Ẑ was 0 gives log Ẑ = -inf) has that infinite mean and se 0:
    the end it gives is infinite whatever its se, and no NaN is formed."""
    x = x.double()
    K = x.shape[-1]
    finite = torch.isfinite(x).all(-1)
    safe = torch.where(finite[..., None], x, 0.0)
    se = safe.std(-1, correction=1) / math.sqrt(K) if K > 1 else torch.zeros(x.shape[:-1], dtype=torch.float64)
    return torch.where(finite, safe.mean(-1), x.mean(-1)), torch.where(finite, se, 0.0)


def log_mean_exp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.logsumexp(x.double(), dim) - math.log(x.shape[dim])


def bracket(low: torch.Tensor, low_se: torch.Tensor, high: torch.Tensor, high_se: torch.Tensor, z: float) -> torch.Tensor:
    """(P, 2) bracket on a KL: [max(0, low - z·low_se), high + z·high_se] (a KL is never negative).
    An end that is undefined (inf - inf, where a side is infinite) is the widest: 0 below, +inf above."""
    lo, hi = low - z * low_se, high + z * high_se
    lo = torch.where(torch.isnan(lo), 0.0, lo).clamp(min=0.0)
    hi = torch.where(torch.isnan(hi), math.inf, hi)
    return torch.stack([lo, hi], -1)


def t_coverage(z: float, dof: int) -> float:
    """P(T <= z) for Student's t with ``dof`` degrees of freedom (Simpson's rule on the density):
    how often mean - z·SE of dof + 1 normal values stays below their expectation (per end)."""
    if z <= 0:
        return 1.0 - t_coverage(-z, dof) if z < 0 else 0.5
    c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    steps = 4000  # even; the density is smooth, so this is exact to ~1e-10 for the z used here
    h = z / steps
    total = 0.0
    for i in range(steps + 1):
        t = i * h
        w = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += w * math.exp(c - (dof + 1) / 2 * math.log1p(t * t / dof))
    return 0.5 + total * h / 3


@dataclass
class Bounds:
    """Two-sided estimates of log Z and brackets on the KLs, per prompt (see the module docstring).

    Every (P, 2) bracket is [low, high]; None where it cannot be formed (no exact samples: only
    the lower side of log Z; no policy: no policy KLs)."""

    method: str
    n: int
    repeats: int
    z: float  # bracket ends moved outwards by z standard errors
    log_Z_lower: torch.Tensor  # (P,) float64 low end of log Z: log_Z_lower_mean - z·se (-inf where a repeat had Ẑ = 0)
    log_Z_lower_se: torch.Tensor  # (P,) standard error of log_Z_lower_mean
    log_Z_upper: torch.Tensor | None  # (P,) float64 high end of log Z: log_Z_upper_mean + z·se
    log_Z_upper_se: torch.Tensor | None  # (P,) standard error of log_Z_upper_mean
    kl_prior: torch.Tensor | None  # (P, 2) bracket on KL(pi*||pi0)
    kl_target_forward: torch.Tensor | None = None  # (P, 2) bracket on KL(pi*||q), with a policy
    kl_target_reverse: torch.Tensor | None = None  # (P, 2) bracket on KL(q||pi*), with a policy
    reward_mean: torch.Tensor | None = None  # (P,) E_pi*[r] from the exact samples
    reward_mean_se: torch.Tensor | None = None
    exact_draws_per_sample: torch.Tensor | None = None  # (P,) prior draws per exact sample (rejection)
    exact_source: str = "none"  # "rejection (R=...)", "given", or why there are none
    seconds: float = float("nan")
    notes: list[str] = field(default_factory=list)
    log_Z_lower_mean: torch.Tensor | None = None  # (P,) mean over repeats of log Ẑ (an estimate: E <= log Z)
    log_Z_upper_mean: torch.Tensor | None = None  # (P,) mean over repeats of conditional log Ẑ (an estimate: E >= log Z)
    degenerate_repeats: torch.Tensor | None = None  # (P,) int64 lower-side repeats whose Ẑ was 0 (every sample lost)
    coverage: float = float("nan")  # per end: P(mean ± z·SE holds its expectation), Student t with repeats-1 dof

    @property
    def reliable(self) -> bool:
        """False where ``repeats`` is too few for ±z standard errors to mean what z suggests
        (per-end coverage below ``RELIABLE_COVERAGE``, e.g. repeats=2)."""
        return self.coverage >= RELIABLE_COVERAGE

    @property
    def log_Z_bracket(self) -> torch.Tensor | None:
        """(P, 2) [log_Z_lower, log_Z_upper], or None with one side only."""
        return None if self.log_Z_upper is None else torch.stack([self.log_Z_lower, self.log_Z_upper], -1)

    @property
    def gap(self) -> torch.Tensor | None:
        """(P,) log_Z_upper_mean - log_Z_lower_mean: how far the two sides' means are from touching
        (+inf where a lower repeat had Ẑ = 0)."""
        return None if self.log_Z_upper_mean is None else self.log_Z_upper_mean - self.log_Z_lower_mean

    def rows(self) -> list[dict]:
        """One dict per prompt, plain floats (None where undefined), for JSON and tables."""

        def f(x, p, j=None):
            if x is None:
                return None
            v = float(x[p] if j is None else x[p, j])
            return v if math.isfinite(v) else None

        out = []
        for p in range(self.log_Z_lower.shape[0]):
            out.append({
                "log_Z_lower": f(self.log_Z_lower, p), "log_Z_upper": f(self.log_Z_upper, p),
                "log_Z_lower_mean": f(self.log_Z_lower_mean, p), "log_Z_lower_se": f(self.log_Z_lower_se, p),
                "log_Z_upper_mean": f(self.log_Z_upper_mean, p), "log_Z_upper_se": f(self.log_Z_upper_se, p),
                "degenerate_repeats": None if self.degenerate_repeats is None else int(self.degenerate_repeats[p]),
                "kl_prior": [f(self.kl_prior, p, 0), f(self.kl_prior, p, 1)] if self.kl_prior is not None else None,
                "kl_target_forward": None if self.kl_target_forward is None else [f(self.kl_target_forward, p, 0), f(self.kl_target_forward, p, 1)],
                "kl_target_reverse": None if self.kl_target_reverse is None else [f(self.kl_target_reverse, p, 0), f(self.kl_target_reverse, p, 1)],
                "exact_draws_per_sample": f(self.exact_draws_per_sample, p),
            })  # fmt: skip
        return out

    def format_summary(self) -> str:
        reliability = "" if self.reliable else " — NOT RELIABLE: too few repeats for their standard errors (see the note)"
        lines = [
            f"bounds ({self.method}, n={self.n}, {self.repeats} repeats; every end moved out by {self.z:g} standard errors, "
            f"each end holds with probability about {self.coverage:.3f} (Student t, {self.repeats - 1} dof){reliability}; "
            f"exact samples: {self.exact_source}; {self.seconds:.1f} s)"
        ]

        def num(v):
            v = float(v)
            return {math.inf: "+inf", -math.inf: "-inf"}.get(v, "n/a" if math.isnan(v) else f"{v:.4g}")

        for p, row in enumerate(self.rows()):

            def br(b):  # a (P, 2) tensor or None
                return "n/a" if b is None else f"[{num(b[p, 0])}, {num(b[p, 1])}]"

            hi = "+inf (no exact samples: no upper side)" if self.log_Z_upper is None else num(self.log_Z_upper[p])
            means = f"lower side's mean {num(self.log_Z_lower_mean[p])}"
            means += "" if not math.isfinite(float(self.log_Z_lower_mean[p])) else f" ± {num(self.log_Z_lower_se[p])}"
            if self.log_Z_upper_mean is not None:
                means += f", upper side's mean {num(self.log_Z_upper_mean[p])} ± {num(self.log_Z_upper_se[p])}"
            lines.append(f"  prompt {p}: log Z in [{num(self.log_Z_lower[p])}, {hi}]   ({means}: estimates)")
            if self.degenerate_repeats is not None and int(self.degenerate_repeats[p]):
                lines.append(f"    {int(self.degenerate_repeats[p])} of {self.repeats} lower-side repeats lost every sample "
                             "(Z^ = 0, kept): the lower side is -inf")  # fmt: skip
            lines.append(f"    KL(pi*||pi0) in {br(self.kl_prior)}")
            if self.kl_target_forward is not None or self.kl_target_reverse is not None:
                lines.append(f"    KL(pi*||q) in {br(self.kl_target_forward)}, KL(q||pi*) in {br(self.kl_target_reverse)}")
            if row["exact_draws_per_sample"] is not None:
                lines.append(f"    exact samples cost {num(row['exact_draws_per_sample'])} prior draws each (rejection)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def check_scale(c: torch.Tensor, beta: float) -> None:
    big = (c / beta).abs() > MAX_SCALE
    if bool(big.any()):
        p = int(big.nonzero()[0])
        raise ValueError(
            f"bounds: reward {float(c[p]):.6g} at beta={beta!r} gives |r/beta| = {abs(float(c[p]) / beta):.3g} > {MAX_SCALE:g}, "
            "beyond which float64 cannot resolve log Z - r/beta; use a larger beta or rescale the reward"
        )


__all__ = ["MAX_SCALE", "RELIABLE_COVERAGE", "Bounds", "bracket", "check_scale", "log_mean_exp", "mean_se", "t_coverage"]
