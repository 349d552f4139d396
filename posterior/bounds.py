"""``pst.bounds``: two-sided estimates of log Z and brackets on the KLs, by bidirectional Monte Carlo.

The estimators' math, the numerics and the result class live in :mod:`posterior.diagnostics.bounds`
(Grosse, Ghahramani & Adams 2015; Zhao et al. 2024). This module is the runner: it draws the exact
samples of pi* (rejection), runs IS or SMC ``repeats`` times for each side (conditional SMC, with an
exact sample as the retained reference, for the upper side) and forms the brackets. It runs the
samplers, so it sits above them (``.ci/floors.py``); ``pst.compare(..., bounds=True)`` calls it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from posterior.diagnostics.bounds import RELIABLE_COVERAGE, Bounds, bracket, check_scale, log_mean_exp, mean_se, t_coverage
from posterior.errors import DegenerateWeightsError
from posterior.posterior import Posterior
from posterior.priors.base import Prior
from posterior.results import SampleResult
from posterior.samplers.common import check_proposal, draw
from posterior.validate import check_int, check_prompts, check_real, check_seed


def _exact_samples(post, prompts, repeats, max_new_tokens, generator, exact_samples, reward_upper_bound, max_draws):
    """(result or None, R or None, source text): exact samples of pi*, at least ``repeats`` per prompt."""
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
    prompts = check_prompts(prompts)
    generator = torch.Generator(device=post.prior.device)
    generator.manual_seed(check_seed("seed", seed, or_none=True))
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
    check_scale(c, beta)
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
        r = draw(post, prompts, n * K, T, generator=generator).rewards.double()  # (P, K·n)
        tick(K)

        def rel(c):
            return log_mean_exp((r.view(r.shape[0], K, n) - c[:, None, None]) / post.beta)

        return rel, r

    @staticmethod
    def upper(post, prompts, n, K, T, generator, options, ref: SampleResult, tick):
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


__all__ = ["METHODS", "Bounds", "bounds"]
