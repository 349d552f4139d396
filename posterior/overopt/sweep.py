"""``pst.overoptimization``: proxy and gold reward along the KL axis, for every sampler and policy.

A reward r is a proxy for what is wanted (the "gold" reward g). Tilting the prior harder toward r
(smaller beta in pi*_beta ∝ pi0 exp(r/beta), larger k in best-of-k, longer training) raises E[r]
while E[g] rises, peaks and falls: overoptimisation (Gao, Schulman & Hilton 2023). Since pi*_beta
is explicit, one pool of prior draws gives the whole curve:

* ``is``: self-normalised IS over ONE shared pool of N prior draws per prompt, reweighted per beta
  (one sampling pass for the whole sweep); delta-method standard errors
  (:mod:`posterior.overopt.estimators`).
* ``bon``: best-of-k on the same pool, k chosen so that log k - (k-1)/k matches that beta's KL
  estimate (the IS one, or the exact one with ``exact=True``); U-statistic means with jackknife
  standard errors; KL(bon||pi0) is log k - (k-1)/k (``kl_prior_kind`` says so).
* ``smc``: one SMC run per beta, ``Posterior(prior, proxy, beta).sample(method="smc")``, its
  weighted particles scored by the gold reward; its KL is SMC's estimate. No standard errors:
  resampling makes the particles dependent, and the naive formula would understate them.
* trained policies: their own n samples: E_q[r], E_q[g] (standard error of a mean) and
  KL(q||pi0) ≈ mean(log q - log pi0).
* ``exact=True`` (an enumerable prior, e.g. a ``CallablePrior`` toy): rows "exact" with the exact
  E[r], E[g], KL of pi*_beta by enumeration, and "bon-exact" with the exact best-of-k law at each
  bon row's k (its true KL, not the bound).

Every row reports estimates with their standard errors (``*_se``) and lists its estimated fields
under ``estimates``; ``kl_prior_bracket`` is None until two-sided KL bounds exist (issue 16), and
is where they plug in. Values are averaged over prompts (standard errors combined as
sqrt(sum se_p^2) / P). Gao et al.'s forms are fitted per method to the gold gain over the prior
(:mod:`posterior.overopt.fits`): best-of-n rows with d (alpha - b d), the others with
d (alpha - b log d), d = sqrt(KL).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch

from posterior.diagnostics.weights import weighted_mean
from posterior.exact import enumerable
from posterior.overopt import METHODS
from posterior.overopt.estimators import best_of_for_kl, exact_best_of, kl_bound, pooled_best_of, pooled_is
from posterior.overopt.fits import fit_gao
from posterior.overopt.report import ROW_KEYS, OveroptReport
from posterior.posterior import Posterior
from posterior.priors.base import Continuations, Prior
from posterior.rewards.base import Reward, as_reward
from posterior.rewards.ensemble import Ensemble
from posterior.seeds import derive_seed
from posterior.validate import check_int, check_prompts, check_seed

FIT_FORM = {"bon": "bon", "bon-exact": "bon"}  # every other method: "rl"


def _reward(r, prior, what: str) -> Reward:
    if isinstance(r, str):
        from posterior.rewards.registry import from_spec

        return from_spec(r, prior=prior)
    try:
        return as_reward(r)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _score_row(reward: Reward, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rewards (N,) of one prompt's texts under a reward already bound to that prompt, and the
    members' scores (M, N) for an Ensemble."""
    if isinstance(reward, Ensemble):
        m = reward.members_scores(texts)  # (M, N) validated per member
        return reward.combine(m), m
    return reward(texts), None


def score(reward: Reward, texts: list[list[str]], prompts: list[str] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rewards (P, N) float64 of [P][N] texts, and the members' scores (M, P, N) for an Ensemble."""
    rows, members = [], []
    for p, row in enumerate(texts):
        r = reward.for_prompt("" if prompts is None else prompts[p], p) if reward.needs_prompts else reward
        values, m = _score_row(r, row)
        rows.append(values)
        if m is not None:
            members.append(m)
    return torch.stack(rows), (torch.stack(members, 1) if members else None)


def _avg(x: torch.Tensor) -> float:
    return float(x.double().mean())


def _avg_se(se: torch.Tensor) -> float:
    """Standard error of the mean over prompts of independent per-prompt estimates."""
    return float(se.double().pow(2).sum().sqrt() / se.numel())


def _se_of_mean(x: torch.Tensor) -> torch.Tensor:
    """(P,) standard error of each row's plain mean over N draws (-inf draws left out of the spread:
    the mean is then -inf anyway)."""
    return torch.where(torch.isfinite(x), x, 0.0).std(-1) / math.sqrt(x.shape[-1])


def _member_stats(members: torch.Tensor | None, w: torch.Tensor | None, prefix: str) -> dict:
    """Per-member means and the members' mean disagreement (population std over members) under
    normalised weights w (P, N) (None: uniform)."""
    if members is None:
        return {}
    M, P, N = members.shape
    w = torch.full((P, N), 1.0 / N, dtype=torch.float64) if w is None else w.double()
    finite = torch.isfinite(members).all(0)  # (P, N)
    s = torch.where(finite[None], members, torch.zeros_like(members))
    std = ((s - s.mean(0, keepdim=True)) ** 2).mean(0).sqrt()  # (P, N)
    wf = torch.where(finite, w, torch.zeros_like(w))
    return {
        f"{prefix}_members": [_avg(weighted_mean(w.log(), members[m])) for m in range(M)],
        f"{prefix}_member_std": _avg((wf * std).sum(-1) / wf.sum(-1).clamp_min(1e-300)),
    }


def _row(method: str, **kw) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(method=method, name=method, kl_prior_bracket=None, estimates=[], se_method=None)
    row.update(kw)
    kl = row["kl_prior"]
    row["sqrt_kl"] = None if kl is None else math.sqrt(max(kl, 0.0))
    return row


def _exact_supports(prior, proxy, gold, max_new_tokens, prompts, limit) -> list[tuple[torch.Tensor, ...]]:
    """(log pi0, proxy, gold) over every continuation of each prompt: (S,) float64 each."""
    from posterior.exact import enumerate_continuations

    eos = set(prior.eos_token_ids)
    out = []
    for p, prompt in enumerate(prompts or [None]):
        seqs, lp = enumerate_continuations(prior, max_new_tokens, prompt, max_sequences=limit)
        texts = [prior.decode([i for i in s if i not in eos]) for s in seqs]
        r, _ = _score_row(proxy.for_prompt(prompt or "", p) if proxy.needs_prompts else proxy, texts)
        g, _ = _score_row(gold.for_prompt(prompt or "", p) if gold.needs_prompts else gold, texts)
        out.append((lp.double(), r, g))
    return out


def _expect(log_q: torch.Tensor, f: torch.Tensor) -> float:
    q = log_q.exp()
    return float(torch.where(q > 0, q * f, torch.zeros_like(q)).sum())


def _kl(log_q: torch.Tensor, log_p: torch.Tensor) -> float:
    q = log_q.exp()
    return float(torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum())


def _exact_values(supports, law) -> tuple[float, float, float]:
    """(E[r], E[g], KL(q||pi0)) averaged over prompts, q = law(log_prior, proxy) per prompt."""
    vals = []
    for lp, r, g in supports:
        lq = law(lp, r)
        vals.append((_expect(lq, r), _expect(lq, g), _kl(lq, lp)))
    return tuple(sum(v[j] for v in vals) / len(vals) for j in range(3))


def _pi_star(beta: float):
    def law(lp, r):
        log_joint = lp + r / beta
        return log_joint - torch.logsumexp(log_joint, 0)

    return law


def _policy_row(prior, name, policy, proxy, gold, *, n, max_new_tokens, prompts, seed) -> dict:
    from posterior.samplers.common import check_proposal

    check_proposal(prior, policy)
    prompt_ids, q_ids = prior.encode_prompts(prompts), policy.encode_prompts(prompts)
    gen = torch.Generator(device=policy.device).manual_seed(derive_seed(seed, f"overopt policy {name}"))  # not the pool's draws
    t0 = time.perf_counter()
    with torch.no_grad():
        cont = policy.sample(q_ids, n, max_new_tokens, generator=gen)
    seconds = time.perf_counter() - t0
    log_q = policy.log_prob(q_ids, cont.tokens, cont.lengths).double()
    log_pi0 = prior.log_prob(prompt_ids, cont.tokens, cont.lengths).double()
    r, rm = score(proxy, cont.texts, prompts)
    g, gm = score(gold, cont.texts, prompts)

    return _row(
        "policy", name=name, proxy_reward=_avg(r.mean(-1)), proxy_reward_se=_avg_se(_se_of_mean(r)),
        gold_reward=_avg(g.mean(-1)), gold_reward_se=_avg_se(_se_of_mean(g)), kl_prior=_avg((log_q - log_pi0).mean(-1)),
        kl_prior_se=_avg_se(_se_of_mean(log_q - log_pi0)), kl_prior_kind="estimate of KL(q||pi0): mean of log q - log pi0",
        ess=None, seconds=seconds, forward_tokens=int(cont.lengths.sum()),
        estimates=["proxy_reward", "gold_reward", "kl_prior"], se_method="standard error of a mean",
        **_member_stats(rm, None, "proxy"), **_member_stats(gm, None, "gold"),
    )  # fmt: skip


def _fits(rows: list[dict], prior_gold: dict[str, float]) -> dict:
    """Gao et al.'s form per method, on the gold gain over the prior, and where gold peaks."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method and r["sqrt_kl"] is not None and r["gold_reward"] is not None]
        form = FIT_FORM.get(method, "rl")
        base = prior_gold["exact" if method.endswith("exact") and "exact" in prior_gold else "pool"]
        observed = max(pts, key=lambda r: r["gold_reward"]) if pts else None
        entry = {"form": form, "observed_peak": None if observed is None else
                 {"beta": observed["beta"], "best_of": observed["best_of"], "name": observed["name"],
                  "kl_prior": observed["kl_prior"], "gold_reward": observed["gold_reward"]}}  # fmt: skip
        try:
            fit = fit_gao([r["sqrt_kl"] for r in pts], [r["gold_reward"] - base for r in pts], form)
        except ValueError as e:
            entry["error"] = str(e)
            out[method] = entry
            continue
        entry.update(fit._asdict())
        kls = sorted((r["kl_prior"], r["beta"]) for r in pts if r["beta"] is not None and r["kl_prior"] > 0)
        entry["peak_in_range"] = fit.kl_peak is not None and bool(kls) and kls[0][0] <= fit.kl_peak <= kls[-1][0]
        entry["beta_peak"] = _interp_beta(fit.kl_peak, kls) if entry["peak_in_range"] else None
        entry["best_of_peak"] = best_of_for_kl(fit.kl_peak) if form == "bon" and fit.kl_peak is not None else None
        out[method] = entry
    return out


def _interp_beta(kl_peak: float, kls: list[tuple[float, float]]) -> float | None:
    """beta at KL = kl_peak, interpolating log beta linearly in KL between the sweep's rows."""
    for (k0, b0), (k1, b1) in zip(kls, kls[1:]):
        if k0 <= kl_peak <= k1:
            t = 0.0 if k1 == k0 else (kl_peak - k0) / (k1 - k0)
            return math.exp((1 - t) * math.log(b0) + t * math.log(b1))
    return kls[0][1] if kls and kls[0][0] == kl_peak else None


@dataclasses.dataclass(frozen=True)
class Pool(Continuations):
    """A sweep's shared pool (``rep.draws``): the prior draws, and what they were drawn from
    (``source``: the prior's name, description and content fingerprint, the prompts and
    max_new_tokens), so that ``draws=`` of another sweep is refused unless it samples the same
    distribution."""

    source: dict | None = dataclasses.field(default=None, repr=False)


def _pool_source(prior: Prior, prompts: list[str] | None, max_new_tokens: int) -> dict:
    """What a pool was drawn from. The prior's fingerprint is the one training checkpoints record
    (weights sample / next-token log-probs / vocabulary; see posterior.train.checkpoint)."""
    from posterior.train.checkpoint import prior_fingerprint

    return {"prior": prior_fingerprint(prior), "prompts": prompts, "max_new_tokens": max_new_tokens}


def _check_draws(draws, P: int, n: int, max_new_tokens: int, source: dict) -> Pool:
    if not isinstance(draws, Continuations):
        raise ValueError(f"draws must be the Continuations of an earlier sweep (rep.draws), got {type(draws).__name__}")
    if not isinstance(draws, Pool) or draws.source is None:
        raise ValueError("draws must be rep.draws of an earlier sweep, which records the prior it was drawn from; "
                         "these Continuations record nothing, so they could be draws of another prior")  # fmt: skip
    if tuple(draws.lengths.shape) != (P, n):
        raise ValueError(f"draws hold {tuple(draws.lengths.shape)} (prompts, samples); this sweep needs ({P}, {n})")
    was, now = draws.source, source
    for key in ("name", "describe", "fingerprint"):
        if was["prior"].get(key) != now["prior"].get(key):
            raise ValueError(
                f"draws were drawn from another prior: its {key} is {was['prior'].get(key)!r}, this sweep's prior's is "
                f"{now['prior'].get(key)!r}; sample a new pool (draws=None) for this prior"
            )  # fmt: skip
    for key in ("prompts", "max_new_tokens"):
        if was[key] != now[key]:
            raise ValueError(f"draws were drawn with {key}={was[key]!r}; this sweep has {key}={now[key]!r}")
    return draws


def overoptimization(
    prior: Prior,
    proxy,
    gold,
    betas: Sequence[float],
    methods: Sequence[str] = METHODS,
    policies: dict | None = None,
    n: int = 256,
    max_new_tokens: int = 32,
    prompts: Sequence[str] | str | None = None,
    seed: int = 0,
    *,
    smc_n: int | None = None,  # particles per SMC run (default n)
    smc_options: dict | None = None,  # Posterior.sample options for "smc", e.g. {"ess_threshold": 0.5}
    exact: bool = False,  # add rows computed by enumeration (an enumerable prior only)
    exact_limit: int = 200_000,  # largest support enumerated with exact=True
    draws=None,  # the pool of an earlier sweep (``rep.draws``): same prior, prompts, n, max_new_tokens (checked)
) -> OveroptReport:
    """Proxy and gold reward against KL(·||pi0) over a sweep of beta; see the module docstring.

    Parameters
    ----------
    prior : Prior
        pi0.
    proxy, gold : Reward, plain function of texts, or a registry spec (``"ensemble:uwo:0.5:sentiment,textblob"``)
        pi*_beta and best-of-k optimise ``proxy``; ``gold`` is only measured.
    betas : sequence of float > 0
    methods : subset of ("is", "smc", "bon")
    policies : dict name -> trained policy (any Prior over the prior's tokens), measured on n samples
    n : prior draws per prompt in the shared pool (IS and best-of-k), and SMC particles (``smc_n``)
    max_new_tokens, prompts, seed : as in ``Posterior.sample``
    draws : Pool, optional
        Reuse the prior draws of an earlier sweep (``rep.draws``) instead of sampling a new pool,
        e.g. to sweep a second proxy over the same draws (a paired comparison, one sampling pass).
        The pool records what it was drawn from; another prior (weights, vocabulary, sampling
        settings), other prompts, another n or max_new_tokens is refused, naming the difference.

    Returns
    -------
    OveroptReport
        ``.rows`` (dicts, :data:`~posterior.overopt.report.ROW_KEYS`), ``.fits``, ``.plot(path)``,
        ``.to_json()``, ``.format_table()``.
    """
    if not isinstance(prior, Prior):
        raise ValueError(f"prior must be a posterior prior (HFPrior, CallablePrior), got {type(prior).__name__}")
    if isinstance(betas, (int, float)) or not isinstance(betas, Sequence) or not betas:
        raise ValueError(f"betas must be a non-empty list of floats > 0, got {betas!r}")
    for b in betas:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
            raise ValueError(f"every beta must be a finite float > 0, got {b!r} in betas={list(betas)}")
    betas = [float(b) for b in betas]
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names from {METHODS}, got {methods}")
    policies = dict(policies or {})
    for name, pol in policies.items():
        if not isinstance(name, str) or not isinstance(pol, Prior):
            raise ValueError(f"policies must map names to trained policies (Priors), got {name!r}: {type(pol).__name__}")
    n = check_int("n", n, 2)
    smc_n = n if smc_n is None else check_int("smc_n", smc_n, 1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    seed = check_seed("seed", seed, or_none=True)
    smc_options = dict(smc_options or {})
    if smc_options and "smc" not in methods:
        raise ValueError(f"smc_options {sorted(smc_options)} given but 'smc' is not in methods {methods}")
    prompts = check_prompts(prompts)
    proxy, gold = _reward(proxy, prior, "proxy"), _reward(gold, prior, "gold")
    if exact and not enumerable(prior, max_new_tokens, limit=exact_limit):
        raise ValueError(
            f"exact=True enumerates the prior's support: it needs a step-wise prior with at most exact_limit={exact_limit} "
            f"continuations of {max_new_tokens} tokens (a CallablePrior toy), got {type(prior).__name__}"
        )

    # --- the shared pool: n prior draws per prompt, one sampling pass for the whole sweep --------
    prompt_ids = prior.encode_prompts(prompts)
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    gen = torch.Generator(device=prior.device).manual_seed(seed)
    source = _pool_source(prior, prompts, max_new_tokens)
    if draws is not None:
        pool = _check_draws(draws, len(prompt_ids), n, max_new_tokens, source)
    t0 = time.perf_counter()
    if draws is None:
        with torch.no_grad():
            drawn = prior.sample(prompt_ids, n, max_new_tokens, generator=gen)
        pool = Pool(**{f.name: getattr(drawn, f.name) for f in dataclasses.fields(Continuations)}, source=source)
    r, r_members = score(proxy, pool.texts, prompts)  # (P, N), (M, P, N) or None
    g, g_members = score(gold, pool.texts, prompts)
    pool_seconds = time.perf_counter() - t0
    P = r.shape[0]
    prior_ref = {
        "proxy_reward": _avg(r.mean(-1)), "proxy_reward_se": _avg_se(_se_of_mean(r)),
        "gold_reward": _avg(g.mean(-1)), "gold_reward_se": _avg_se(_se_of_mean(g)),
    }  # fmt: skip
    pool_info = {"n": n, "seconds": pool_seconds, "forward_tokens": int(pool.lengths.sum()),
                 "max_kl": math.log(n), "reused": draws is not None}  # fmt: skip
    values = torch.stack([r, g])  # (2, P, N)

    rows: list[dict] = []
    is_kl: dict[float, float] = {}
    for beta in betas:
        t1 = time.perf_counter()
        est = pooled_is(r, values, beta)
        is_kl[beta] = _avg(est.kl)
        if "is" in methods:
            w = est.weights
            rows.append(_row(
                "is", beta=beta, proxy_reward=_avg(est.means[0]), proxy_reward_se=_avg_se(est.means_se[0]),
                gold_reward=_avg(est.means[1]), gold_reward_se=_avg_se(est.means_se[1]),
                kl_prior=is_kl[beta], kl_prior_se=_avg_se(est.kl_se),
                kl_prior_kind="estimate of KL(pi*||pi0): self-normalised IS over the shared pool",
                ess=_avg(est.ess), seconds=time.perf_counter() - t1, forward_tokens=0,
                estimates=["proxy_reward", "gold_reward", "kl_prior"], se_method="delta method",
                **_member_stats(r_members, w, "proxy"), **_member_stats(g_members, w, "gold"),
            ))  # fmt: skip

    bon_ks: list[tuple[float, int]] = []
    notes = [f"IS and best-of-k reweight one pool of {n} prior draws per prompt ({pool_seconds:.2f} s, "
             f"{pool_info['forward_tokens']} tokens); IS estimates of KL are at most log {n} = {math.log(n):.2f}"]  # fmt: skip
    exact_rows, exact_ref, supports = [], None, None
    if exact:
        supports = _exact_supports(prior, proxy, gold, max_new_tokens, prompts, exact_limit)
        for beta in betas:
            pr, gr, kl = _exact_values(supports, _pi_star(beta))
            exact_rows.append(_row("exact", beta=beta, proxy_reward=pr, gold_reward=gr, kl_prior=kl,
                                   kl_prior_kind="exact KL(pi*||pi0)"))  # fmt: skip
        pr, gr, _ = _exact_values(supports, lambda lp, r: lp)
        exact_ref = {"proxy_reward": pr, "gold_reward": gr}
    if "bon" in methods:
        target = {row["beta"]: row["kl_prior"] for row in exact_rows} if exact else is_kl
        for beta in betas:
            t1 = time.perf_counter()
            k = best_of_for_kl(target[beta])
            capped = k > n - 1
            k = min(k, n - 1)
            if capped:
                notes.append(f"bon at beta={beta:g}: best_of capped at n-1 = {n - 1} (KL {target[beta]:.3g} needs more draws)")
            est = pooled_best_of(r, values, k)
            bon_ks.append((beta, k))
            rows.append(_row(
                "bon", beta=beta, best_of=k, proxy_reward=_avg(est.means[0]), proxy_reward_se=_avg_se(est.means_se[0]),
                gold_reward=_avg(est.means[1]), gold_reward_se=_avg_se(est.means_se[1]),
                kl_prior=kl_bound(k), kl_prior_se=None, kl_prior_kind="bound log k - (k-1)/k (exact without reward ties)",
                ess=None, seconds=time.perf_counter() - t1, forward_tokens=0,
                estimates=["proxy_reward", "gold_reward"], se_method="jackknife of the U-statistic",
                kl_matched=target[beta],
                **_member_stats(r_members, est.weights, "proxy"), **_member_stats(g_members, est.weights, "gold"),
            ))  # fmt: skip

    if "smc" in methods:
        for i, beta in enumerate(betas):
            res = Posterior(prior, proxy, beta).sample(n=smc_n, method="smc", max_new_tokens=max_new_tokens,
                                                       prompts=prompts, seed=(seed + 1 + i) % 2**64, **smc_options)  # fmt: skip
            gs, gm = score(gold, res.texts, prompts)
            rs_members = score(proxy, res.texts, prompts)[1] if r_members is not None else None
            w = res.log_weights.double().exp()  # (P, N) normalised
            kl = res.kl()
            rows.append(_row(
                "smc", beta=beta, proxy_reward=_avg(res.reward_mean()), gold_reward=_avg(weighted_mean(res.log_weights, gs)),
                kl_prior=None if kl is None else _avg(kl), kl_prior_kind="estimate of KL(pi*||pi0) by SMC (E[r]/beta - log Z)",
                ess=_avg(res.ess), seconds=float(res.seconds), forward_tokens=int(res.lengths.sum()),
                estimates=["proxy_reward", "gold_reward", "kl_prior", "forward_tokens"], se_method=None,
                **_member_stats(rs_members, w, "proxy"), **_member_stats(gm, w, "gold"),
            ))  # fmt: skip
        notes.append("smc rows: one run per beta; no standard errors (resampled particles are dependent); "
                     "forward_tokens counts final particle lengths")  # fmt: skip

    for name, policy in policies.items():
        rows.append(_policy_row(prior, name, policy, proxy, gold, n=n, max_new_tokens=max_new_tokens,
                                prompts=prompts, seed=seed))  # fmt: skip

    if exact:
        rows += exact_rows
        for beta, k in bon_ks:
            pr, gr, kl = _exact_values(supports, lambda lp, r, k=k: exact_best_of(lp, r, k))
            rows.append(_row("bon-exact", beta=beta, best_of=k, proxy_reward=pr, gold_reward=gr, kl_prior=kl,
                             kl_prior_kind="exact KL(bon_k||pi0)", kl_prior_bound=kl_bound(k)))  # fmt: skip
    prior_gold = {"pool": prior_ref["gold_reward"]}
    if exact_ref is not None:
        prior_gold["exact"] = exact_ref["gold_reward"]
    fits = _fits(rows, prior_gold)
    return OveroptReport(
        proxy=proxy.name, gold=gold.name, prompts=prompts, n=n, max_new_tokens=max_new_tokens, seed=seed, rows=rows,
        fits=fits, prior=prior_ref, prior_exact=exact_ref, pool=pool_info, notes=notes, num_prompts=P, draws=pool,
    )  # fmt: skip


__all__ = ["METHODS", "Pool", "overoptimization", "score"]
