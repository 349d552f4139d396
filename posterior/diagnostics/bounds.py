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
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from posterior.results import SampleResult

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


def _exact_samples(post, prompts, repeats, max_new_tokens, generator, exact_samples, reward_upper_bound, max_draws):
    """(result or None, R or None, source text): exact samples of pi*, at least ``repeats`` per prompt."""
    from posterior.errors import DegenerateWeightsError, check_real

    P = 1 if prompts is None else len(prompts)
    if exact_samples is not None:
        if not isinstance(exact_samples, SampleResult) or not exact_samples.targets_posterior:
            raise ValueError(f"exact_samples must be a SampleResult of exact samples of pi* (e.g. method='rejection'), got {exact_samples!r:.80}")
        if exact_samples.beta != post.beta:
            raise ValueError(
                f"exact_samples were drawn at beta={exact_samples.beta!r}, this posterior has beta={post.beta!r}: they are "
                "samples of another pi*; draw them from this posterior (or leave exact_samples out)"
            )
        if exact_samples.prompts != prompts:
            raise ValueError(
                f"exact_samples were drawn for prompts {exact_samples.prompts!r:.120}, bounds runs on {prompts!r:.120}: "
                "give samples of the same prompts, in the same order"
            )
        if exact_samples.method not in ("rejection",) and not exact_samples.info.get("exact", False):
            raise ValueError(
                f"exact_samples come from method {exact_samples.method!r}, whose samples are not exact draws of pi*; "
                "use method='rejection', or mark a result of exact samples with info['exact'] = True"
            )
        if tuple(exact_samples.log_weights.shape) < (P, repeats) or exact_samples.log_weights.shape[0] != P:
            raise ValueError(
                f"exact_samples has shape {tuple(exact_samples.log_weights.shape)}; bounds needs {P} prompt(s) with "
                f"at least repeats={repeats} samples each"
            )
        return exact_samples, None, "given"
    R = reward_upper_bound if reward_upper_bound is not None else post.reward.upper_bound
    if R is None:
        return None, None, (
            f"none: reward {post.reward.name} declares no upper bound (pass reward_upper_bound= or exact_samples=), "
            "so only the lower side of log Z is estimated"
        )
    R = check_real("reward_upper_bound", R)
    try:
        res = post.sample(
            n=repeats, method="rejection", max_new_tokens=max_new_tokens, prompts=prompts, generator=generator,
            reward_upper_bound=R, max_draws=max_draws,
        )  # fmt: skip
    except DegenerateWeightsError as e:
        raise DegenerateWeightsError(
            f"bounds: the exact samples of pi* (rejection at R={R:g}) ran out of draws: {e} (give bounds max_draws=..., "
            "pst.compare bounds_max_draws=..., or posterior compare --bounds-max-draws N; or pass exact_samples=)",
            rows=e.rows,
        ) from e
    return res, R, f"rejection (R={R:g})"


def _check_scale(c: torch.Tensor, beta: float) -> None:
    big = (c / beta).abs() > MAX_SCALE
    if bool(big.any()):
        p = int(big.nonzero()[0])
        raise ValueError(
            f"bounds: reward {float(c[p]):.6g} at beta={beta!r} gives |r/beta| = {abs(float(c[p]) / beta):.3g} > {MAX_SCALE:g}, "
            "beyond which float64 cannot resolve log Z - r/beta; use a larger beta or rescale the reward"
        )


def bounds(
    post,
    *,
    n: int,
    repeats: int,
    max_new_tokens: int,
    prompts: Sequence[str] | str | None = None,
    method: str = "smc",
    exact_samples: SampleResult | None = None,
    policy=None,
    seed: int = 0,
    z: float = 3.0,  # bracket ends moved outwards by z standard errors
    reward_upper_bound: float | None = None,  # default: post.reward.upper_bound
    max_draws: int | None = None,  # prior draws per prompt for the exact samples by rejection (None: 1000·repeats)
    progress: bool = False,  # a tqdm bar on stderr over the exact samples and the 2·repeats runs
    **options,  # the sampler's options (SMC: twist, proposal, block_size, ess_threshold, ...)
) -> Bounds:
    """Two-sided estimates of log Z per prompt and the KL brackets they imply (module docstring).

    Parameters
    ----------
    post : Posterior
    n : int
        Samples (IS) or particles (SMC) per run.
    repeats : int >= 2
        Independent runs of each side (and exact samples per prompt); standard errors are over them.
        With few repeats the standard errors are noisy: ``coverage`` says how often an end holds
        (Student t), and a result below ``RELIABLE_COVERAGE`` (repeats=2 at z=3) says it is not
        reliable. 8 or more is a good default.
    method : "smc" | "is"
        The estimator whose two sides are formed.
    exact_samples : SampleResult, optional
        Exact samples of pi* (at least ``repeats`` per prompt); default: rejection sampling with the
        reward's upper bound.
    policy : Prior, optional
        A model q over the same tokens: brackets on KL(pi*||q) and KL(q||pi*) too.
    max_draws : int, optional
        Prior draws per prompt the rejection sampler may make for the exact samples (its
        ``max_draws``); raise it where the error says the exact samples ran out of draws.

    Returns
    -------
    Bounds
    """
    from posterior.errors import check_int, check_real
    from posterior.posterior import Posterior, _check_prompts, _check_seed
    from posterior.priors.base import Prior
    from posterior.samplers.common import check_proposal, draw

    if not isinstance(post, Posterior):
        raise ValueError(f"bounds needs a posterior.Posterior, got {type(post).__name__}")
    n = check_int("n", n, 1)
    repeats = check_int("repeats", repeats, 2)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    z = check_real("z", z)
    if z < 0:
        raise ValueError(f"z must be >= 0, got {z!r}")
    if max_draws is not None:
        max_draws = check_int("max_draws", max_draws, 1)
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be a bool, got {progress!r}")
    if exact_samples is not None and max_draws is not None:
        raise ValueError("max_draws limits the rejection sampler that draws exact samples; with exact_samples= given it has no use")
    if method not in METHODS:
        raise ValueError(f"bounds: method must be one of {sorted(METHODS)}, got {method!r}")
    if method == "is" and options:
        raise TypeError(f"bounds with method='is' takes no sampler options, got {sorted(options)}")
    if policy is not None:
        if not isinstance(policy, Prior):
            raise ValueError(f"policy must be a posterior prior (a trained policy), got {type(policy).__name__}")
        check_proposal(post.prior, policy)
    prompts = _check_prompts([prompts] if isinstance(prompts, str) else prompts)
    generator = torch.Generator(device=post.prior.device)
    generator.manual_seed(_check_seed(seed))
    beta = post.beta
    t0 = time.perf_counter()
    notes: list[str] = []

    coverage = t_coverage(z, repeats - 1)
    if coverage < RELIABLE_COVERAGE:
        notes.append(
            f"not reliable: with repeats={repeats} each standard error rests on {repeats} runs, so an end moved out by "
            f"{z:g} of them holds with probability about {coverage:.3f} (Student t, {repeats - 1} dof), not the "
            f"{0.5 * (1 + math.erf(z / math.sqrt(2))):.4f} a normal z suggests; use repeats >= 8"
        )
    bar = tqdm(total=2 * repeats + 1, desc=f"bounds {method}", unit="run", disable=not progress, leave=False, file=sys.stderr,
               mininterval=0)  # fmt: skip
    bar.set_postfix_str("exact samples", refresh=False)
    ex, R, source = _exact_samples(post, prompts, repeats, max_new_tokens, generator, exact_samples, reward_upper_bound, max_draws)
    bar.update(1)
    bar.set_postfix_str("lower side", refresh=False)
    lower, lower_rewards = METHODS[method].lower(post, prompts, n, repeats, max_new_tokens, generator, options, bar.update)
    # reference reward c per prompt: the bound where there is one, else the largest finite reward seen
    seen = lower_rewards if ex is None else torch.cat([lower_rewards, ex.rewards.double()], -1)
    seen = torch.where(torch.isfinite(seen), seen, -math.inf)
    c = torch.full((seen.shape[0],), float(R), dtype=torch.float64) if R is not None else seen.max(-1).values
    c = torch.where(torch.isfinite(c), c, 0.0)
    _check_scale(c, beta)
    runs = lower(c)  # (P, K) log Ẑ - c/beta of the K runs; -inf where a run lost every sample (Ẑ = 0)
    L, L_se = mean_se(runs)  # (P,)
    dead = torch.isneginf(runs).sum(-1)  # (P,)
    if bool(dead.any()):
        which = ", ".join(f"prompt {p}: {int(k)} of {repeats}" for p, k in enumerate(dead.tolist()) if k)
        helps = ("proposal='tilted' with a twist that favours the constraint, or more particles (n)" if method == "smc"
                 else "more samples (n), or method='smc' with proposal='tilted' and a twist that favours the constraint")  # fmt: skip
        notes.append(
            f"lower side: runs that lost every sample (Z^ = 0, log Z^ = -inf) — {which}: kept, as legitimate draws of "
            f"an unbiased estimator (dropping them would bias the lower side upwards), so that side is -inf and the KL "
            f"ends resting on it are 0 or +inf; what helps: {helps}"
        )

    U = U_se = kl_prior = fwd = rev = m = m_se = cost = None
    if ex is not None:
        ref = _first(ex, repeats)
        bar.set_postfix_str("upper side", refresh=False)
        upper = METHODS[method].upper(post, prompts, n, repeats, max_new_tokens, generator, options, ref, bar.update)
        U, U_se = mean_se(upper(c))
        m, m_se = mean_se(ex.rewards.double())
        rel = (m - c) / beta
        kl_prior = bracket(rel - U, torch.hypot(m_se / beta, U_se), rel - L, torch.hypot(m_se / beta, L_se), z)
        if "draws" in ex.info:
            cost = ex.info["draws"].double() / ex.rewards.shape[1]
    else:
        notes.append(source)
    if policy is not None:
        d = draw(post, prompts, n * repeats, max_new_tokens, generator=generator, proposal=policy)
        a, a_se = mean_se(d.log_q.double() - d.log_prior.double() - (d.rewards - c[:, None]) / beta)  # +inf where q draws outside pi*'s support
        if U is None:  # one side only: KL(q||pi*) >= a + L in expectation
            rev = bracket(a + L, torch.hypot(a_se, L_se), torch.full_like(a, math.inf), torch.zeros_like(a), z)
            notes.append("KL(q||pi*) has a lower end only, KL(pi*||q) none: no exact samples")
        else:
            rev = bracket(a + L, torch.hypot(a_se, L_se), a + U, torch.hypot(a_se, U_se), z)
            log_q = policy.log_prob(policy.encode_prompts(prompts), ex.tokens, ex.lengths).double()
            b, b_se = mean_se(ex.log_prior.double() + (ex.rewards.double() - c[:, None]) / beta - log_q)
            fwd = bracket(b - U, torch.hypot(b_se, U_se), b - L, torch.hypot(b_se, L_se), z)
            fwd = torch.where(torch.isposinf(b)[:, None], math.inf, fwd)  # q gives 0 to an exact sample: KL(pi*||q) = inf
        rev = torch.where(torch.isposinf(a)[:, None], math.inf, rev)  # q drew outside pi*'s support: KL(q||pi*) = inf
    bar.close()
    notes.append(
        f"log Z's ends and the KL brackets are the sides' means over the repeats moved out by {z:g} standard errors: "
        "estimates of bounds, not certain bounds (log_Z_lower_mean / log_Z_upper_mean are the plain means)"
    )
    return Bounds(
        method=method, n=n, repeats=repeats, z=z,
        log_Z_lower=L - z * L_se + c / beta, log_Z_lower_se=L_se,
        log_Z_upper=None if U is None else U + z * U_se + c / beta, log_Z_upper_se=U_se,
        kl_prior=kl_prior, kl_target_forward=fwd, kl_target_reverse=rev, reward_mean=m, reward_mean_se=m_se,
        exact_draws_per_sample=cost, exact_source=source, seconds=time.perf_counter() - t0, notes=notes,
        log_Z_lower_mean=L + c / beta, log_Z_upper_mean=None if U is None else U + c / beta,
        degenerate_repeats=dead, coverage=coverage,
    )  # fmt: skip


def _first(res: SampleResult, k: int) -> SampleResult:
    """The first k samples of each prompt of a result (the references of the k upper runs)."""
    from dataclasses import replace

    T = int(res.lengths[:, :k].max())
    return replace(
        res, texts=[row[:k] for row in res.texts], tokens=res.tokens[:, :k, :T], lengths=res.lengths[:, :k],
        log_weights=res.log_weights[:, :k], rewards=res.rewards[:, :k], log_prior=res.log_prior[:, :k],
    )  # fmt: skip


# --- the estimators' two sides -------------------------------------------------------------------
# Each side returns ``rel(c) -> (P, K)``: the K runs' log Ẑ - c/beta for a reference reward c (P,),
# so that IS forms (r - c)/beta before exponentiating and stays exact at any scale.
class _IS:
    """Importance sampling from the prior: w = exp(r/beta)."""

    @staticmethod
    def lower(post, prompts, n, K, T, generator, options, tick):
        from posterior.samplers.common import draw

        r = draw(post, prompts, n * K, T, generator=generator).rewards.double()  # (P, K·n)
        tick(K)

        def rel(c):
            return log_mean_exp((r.view(r.shape[0], K, n) - c[:, None, None]) / post.beta)

        return rel, r

    @staticmethod
    def upper(post, prompts, n, K, T, generator, options, ref: SampleResult, tick):
        from posterior.samplers.common import draw

        r_star = ref.rewards.double()[..., None]  # (P, K, 1): one exact sample per run
        if n > 1:
            r = draw(post, prompts, (n - 1) * K, T, generator=generator).rewards.double()
            r_star = torch.cat([r_star, r.view(r_star.shape[0], K, n - 1)], -1)  # (P, K, n)
        tick(K)

        def rel(c):
            return log_mean_exp((r_star - c[:, None, None]) / post.beta)

        return rel


class _SMC:
    """SMC (any twist, proposal, block size): its own log Ẑ below; conditional SMC above, with
    the exact sample as the retained reference particle (the engine's ``reference`` hook), which
    needs multinomial resampling (the engine's conditional scheme). Both sides use the same
    resampling so that they bracket the same estimator."""

    @staticmethod
    def _options(options):
        opts = dict(options)
        if opts.setdefault("resampling", "multinomial") != "multinomial":
            raise ValueError(
                f"bounds with method='smc' resamples multinomially (conditional SMC has no {opts['resampling']!r} "
                "version here); drop the resampling option"
            )
        return opts

    @staticmethod
    def _run(post, **kw) -> SampleResult:
        """One SMC run; a run in which every particle of a prompt died has Ẑ = 0 there (log Ẑ = -inf):
        the sampler raises for want of samples, with that honest result attached, which is kept."""
        from posterior.errors import DegenerateWeightsError

        try:
            return post.sample(method="smc", **kw)
        except DegenerateWeightsError as e:
            if getattr(e, "result", None) is None:
                raise
            return e.result

    @staticmethod
    def lower(post, prompts, n, K, T, generator, options, tick):
        opts = _SMC._options(options)
        runs = []
        for _ in range(K):
            runs.append(_SMC._run(post, n=n, max_new_tokens=T, prompts=prompts, generator=generator, **opts))
            tick(1)
        log_Z = torch.stack([r.log_Z for r in runs], -1)  # (P, K) absolute: the sampler's own
        rewards = torch.cat([r.rewards.double() for r in runs], -1)

        def rel(c):
            return log_Z - c[:, None] / post.beta

        return rel, rewards

    @staticmethod
    def upper(post, prompts, n, K, T, generator, options, ref: SampleResult, tick):
        opts = _SMC._options(options)
        log_Z = []
        for k in range(K):
            reference = (ref.tokens[:, k], ref.lengths[:, k])  # (P, T'), (P,): one exact sample per prompt
            res = _SMC._run(post, n=n, max_new_tokens=T, prompts=prompts, generator=generator, reference=reference, **opts)
            log_Z.append(res.log_Z)
            tick(1)
        log_Z = torch.stack(log_Z, -1)

        def rel(c):
            return log_Z - c[:, None] / post.beta

        return rel


METHODS = {"is": _IS, "smc": _SMC}
