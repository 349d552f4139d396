"""Rejection sampling and quasi-rejection sampling (QRS) of pi*.

Rejection (exact). With a bound R >= r(x) for all x, draw x ~ pi0 and accept with probability
a(x) = exp((r(x) - R)/beta) <= 1. Accepted draws are exact samples of pi*; the acceptance
probability is p = E_pi0[a(x)] = Z·exp(-R/beta). Stopping at the m-th acceptance after D draws (a
negative binomial count), p̂ = (m - 1)/(D - 1) is unbiased for m >= 2 (Haldane 1945):
E[(m-1)/(D-1)] = sum_d (m-1)/(d-1)·C(d-1, m-1) p^m (1-p)^(d-m) = p·sum_d C(d-2, m-2) p^(m-1) (1-p)^(d-m) = p,
so Ẑ = exp(R/beta)·p̂ is unbiased, positive and finite. For n = 1 no such estimator exists from a
run that stops at the first acceptance (the only unbiased function of D is 1{D = 1}, mostly 0: a
log Ẑ of -inf; and n/D, used before, was biased by +160%), so with n = 1 the sampler draws on to a
second acceptance (m = 2, about 1/p more draws) and returns the first accepted sample, which
is exact whatever happens after it. The KL estimate uses every accepted sample (m of them).

QRS (Eikema, Kruszewski, Dance, Aziz & Dymetman 2022). For a proposal q, unnormalised target
P(x) = pi0(x) exp(r(x)/beta), log-weight log w = log P - log q and a constant B = exp(log_bound),
accept x ~ q with probability min(1, w/B). Accepted draws follow p_B(x) ∝ min(q(x)·B, P(x)), which
tends to pi* as B grows (exactly pi* once B >= max w) while the acceptance rate falls. Its
diagnostics (Ẑ, acceptance rate, TV and KL to pi*) come from every proposal draw
(:func:`posterior.diagnostics.qrs.qrs_estimates`); its KL(pi*||pi0) is the importance estimate over
those draws. The default bound is, per prompt, the largest log-weight of a pilot batch.

Both work with reward differences ((r - R)/beta; (r - c)/beta + log pi0 - log q with c a reward of
the prompt), so they stay exact at any beta whose R/beta (or c/beta) float64 can hold.

Failing fast. Each draw's acceptance probability a_i is known, so after every batch the draws still
needed are estimated from the accumulated a_i, optimistically (as if one more draw were accepted
for sure, plus three standard errors; with every a_i = 0, the "rule of three" rate 3/D). When even
that exceeds ``max_draws`` (default 1000·n per prompt) the sampler raises at once, instead of
drawing for minutes towards a count it cannot reach.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from posterior.diagnostics.qrs import qrs_estimates
from posterior.diagnostics.tilt import kl_estimate, relative_log_weights, reward_shift, scaled
from posterior.diagnostics.weights import log_weight_stats
from posterior.errors import DegenerateWeightsError
from posterior.priors.base import Continuations
from posterior.results import Info
from posterior.samplers.common import draw, make_result, prompt_name, uniform_log_weights
from posterior.samplers.options import BatchingOptions, QRSOptions, RejectionOptions
from posterior.samplers.registry import Method, register

DRAWS_PER_SAMPLE = 1000  # default max_draws = DRAWS_PER_SAMPLE · n per prompt


def draws_needed(log_accept: torch.Tensor, accepted: int, n: int) -> tuple[float, float]:
    """(point estimate, optimistic estimate) of the total draws for n acceptances of one prompt.

    Parameters
    ----------
    log_accept : Tensor (D,)
        log acceptance probability of every draw so far (-inf allowed).
    accepted : int
        Acceptances so far.
    """
    D = log_accept.numel()
    left = n - accepted
    if left <= 0:
        return float(D), float(D)
    top = float(log_accept.max()) if D else -math.inf
    if not math.isfinite(top):  # no draw could have been accepted: only the rule of three
        return math.inf, D + left * D / 3.0
    u = torch.exp(log_accept.double() - top)  # (D,) a_i / max a
    log_rate = top + math.log(float(u.sum())) - math.log(D)
    log_rate_hi = top + math.log(float(u.sum()) + 1.0 + 3.0 * math.sqrt(float((u * u).sum()))) - math.log(D)
    point = D + left * math.exp(min(-log_rate, 700.0))
    optimistic = D + left * math.exp(min(-log_rate_hi, 700.0))
    return point, optimistic


def _accept_until(post, prompts, n, max_new_tokens, generator, progress, proposal, batch, max_draws, log_accept, what):
    """Draw batches from the proposal, accept each draw with probability exp(log_accept(d, rows)),
    until every prompt has n acceptances. ``rows`` are the prompt indices of the batch's rows.

    Returns the accepted samples and, per prompt, the number of draws up to (and including) the
    n-th acceptance, with the reward and log pi0 - log q (None for the prior) of every draw made
    (the whole of the last batch included)."""
    P = 1 if prompts is None else len(prompts)
    accepted: list[list[tuple]] = [[] for _ in range(P)]  # (tokens, length, text, log_prior, reward)
    draws_used = [0] * P
    seen_rewards: list[list[torch.Tensor]] = [[] for _ in range(P)]
    seen_ratio: list[list[torch.Tensor]] = [[] for _ in range(P)]
    seen_accept: list[list[torch.Tensor]] = [[] for _ in range(P)]
    todo = list(range(P))
    bar = tqdm(total=P * n, desc=what, unit="sample", disable=not progress, leave=False)
    t0 = time.perf_counter()
    try:
        while todo:
            sub = None if prompts is None else [prompts[p] for p in todo]
            d = draw(post, sub, batch, max_new_tokens, generator=generator, proposal=proposal)
            log_acc = log_accept(d, todo)  # (p, batch) float64
            u = torch.rand(log_acc.shape, generator=generator, dtype=torch.float64, device=generator.device).cpu()
            acc = torch.log(u) < log_acc
            ratio = d.log_ratio()
            still = []
            for j, p in enumerate(todo):
                used = batch
                for i in range(batch):
                    if acc[j, i]:
                        accepted[p].append((d.cont.tokens[j, i], d.cont.lengths[j, i], d.cont.texts[j][i], d.log_prior[j, i], d.rewards[j, i]))
                        if len(accepted[p]) == n:
                            used = i + 1
                            break
                draws_used[p] += used
                # Every draw of the batch is an iid proposal draw: all of them feed the estimates.
                seen_rewards[p].append(d.rewards[j])
                seen_ratio[p].append(None if ratio is None else ratio[j])
                seen_accept[p].append(log_acc[j])
                if len(accepted[p]) < n:
                    _check_budget(what, prompts, p, torch.cat(seen_accept[p]), len(accepted[p]), n, max_draws)
                    still.append(p)
            todo = still
            if progress:  # the bar counts acceptances, which may stay at 0 for minutes: say why
                bar.set_postfix_str(_progress_note(seen_accept, accepted, n, todo, time.perf_counter() - t0), refresh=False)
            bar.update(sum(len(a) for a in accepted) - bar.n)
    finally:
        bar.close()
    tokens = _pad_stack([[a[0] for a in acc_p] for acc_p in accepted], post.prior.eos_token_ids[0])
    lengths = torch.stack([torch.stack([a[1] for a in acc_p]) for acc_p in accepted])
    texts = [[a[2] for a in acc_p] for acc_p in accepted]
    log_prior = torch.stack([torch.stack([a[3] for a in acc_p]) for acc_p in accepted])
    rewards = torch.stack([torch.stack([a[4] for a in acc_p]) for acc_p in accepted])
    cont = Continuations(tokens, lengths, log_prior, texts)
    all_rewards = [torch.cat(r) for r in seen_rewards]
    all_ratio = [None if r[0] is None else torch.cat(r) for r in seen_ratio]
    return cont, log_prior, rewards, torch.tensor(draws_used), all_rewards, all_ratio


def _progress_note(seen_accept, accepted, n: int, todo: list[int], seconds: float) -> str:
    """Draws so far, acceptances, the estimated acceptance rate (mean acceptance probability of
    the draws) and the expected time left (draws still needed at the mean time per draw)."""
    log_acc = [torch.cat(a) for a in seen_accept]
    draws = sum(a.numel() for a in log_acc)
    got = sum(len(a) for a in accepted)
    rate = float(torch.cat(log_acc).double().exp().mean()) if draws else 0.0
    left = sum(draws_needed(log_acc[p], len(accepted[p]), n)[0] - log_acc[p].numel() for p in todo)
    eta = tqdm.format_interval(left * seconds / draws) if draws and math.isfinite(left) else "?"
    return f"draws {draws}, accepted {got}, est. acceptance rate {rate:.3g}, ~{eta} left"


def _pad_stack(rows: list[list[torch.Tensor]], pad: int) -> torch.Tensor:
    """Stack [P][n] token vectors of (possibly) different lengths, EOS-padded: (P, n, T)."""
    T = max(t.numel() for row in rows for t in row)
    out = torch.full((len(rows), len(rows[0]), T), pad, dtype=torch.long)
    for p, row in enumerate(rows):
        for i, t in enumerate(row):
            out[p, i, : t.numel()] = t
    return out


def _check_budget(what, prompts, p, log_acc, accepted, n, max_draws):
    D = log_acc.numel()
    point, optimistic = draws_needed(log_acc, accepted, n)
    if D >= max_draws or optimistic > max_draws:
        rate = float(torch.exp(torch.logsumexp(log_acc, 0) - math.log(D))) if D else 0.0
        about = "an unknown number of" if not math.isfinite(point) else f"about {point:.3g}"
        raise DegenerateWeightsError(
            f"{what}: prompt {prompt_name(prompts, p)} accepted {accepted} of {D} draws (mean acceptance "
            f"probability {rate:.3g}), short of n={n}: it would need {about} draws (at least {optimistic:.3g} even "
            f"optimistically), more than max_draws={max_draws}; raise max_draws, tighten the bound, or raise beta",
            rows=[p],
        )


def _batching(o: BatchingOptions, n: int) -> tuple[int, int]:
    """Draws per round and the cap per prompt: the options, or n and 1000·n for None."""
    batch = n if o.batch_size is None else o.batch_size
    cap = DRAWS_PER_SAMPLE * n if o.max_draws is None else o.max_draws
    return batch, cap


@dataclass(frozen=True, eq=False)
class RejectionInfo(Info):
    """``res.info`` of ``method="rejection"``; tensors are (P,)."""

    acceptance_rate: torch.Tensor | None = None  # acceptances / draws
    draws: torch.Tensor | None = None  # proposal draws up to the last acceptance
    max_draws: int | None = None  # the cap per prompt
    acceptances: int | None = None  # m: acceptances drawn (2 for n = 1: an unbiased log Z)


@dataclass(frozen=True, eq=False)
class QRSInfo(Info):
    """``res.info`` of ``method="qrs"``; tensors are (P,)."""

    log_bound: torch.Tensor | None = None  # log B per prompt
    acceptance_rate: torch.Tensor | None = None
    tv_estimate: torch.Tensor | None = None  # estimate of TV(pi*, p_B)
    kl_estimate: torch.Tensor | None = None  # estimate of KL(pi*||p_B)
    draws: torch.Tensor | None = None
    max_draws: int | None = None


def rejection_sampling(post, prompts, options: RejectionOptions, *, n: int, max_new_tokens: int, generator, progress: bool = False):
    reward_upper_bound = options.reward_upper_bound  # R >= r(x) for every x (None: the reward's upper_bound)
    if reward_upper_bound is None:
        reward_upper_bound = post.reward.upper_bound
    if reward_upper_bound is None:
        raise ValueError(
            "rejection sampling needs a finite reward_upper_bound >= every reward, got None "
            "(e.g. 1.0 for Sentiment, 0.0 for Contains)"
        )
    try:
        R = RejectionOptions.table()["reward_upper_bound"].check("reward_upper_bound", reward_upper_bound)  # the reward's bound
    except ValueError as e:
        raise ValueError(f"rejection sampling needs a finite reward_upper_bound >= every reward: {e}") from None
    batch, cap = _batching(options, n)
    P = 1 if prompts is None else len(prompts)
    offset = scaled(torch.full((P,), R, dtype=torch.float64), post.beta, what="reward_upper_bound")  # R/beta

    def log_accept(d, rows):
        over = d.rewards > R
        if bool(over.any()):
            j, i = over.nonzero()[0].tolist()
            raise ValueError(
                f"reward_upper_bound={R} is not an upper bound: reward {d.rewards[j, i].item():.6g} "
                f"for text {d.cont.texts[j][i]!r}"
            )
        return (d.rewards - R) / post.beta

    m = max(n, 2)  # acceptances to stop at: Ẑ needs m >= 2 to be unbiased (module docstring)
    cont, log_prior, rewards, draws, _, _ = _accept_until(
        post, prompts, m, max_new_tokens, generator, progress, None, batch, cap, log_accept, "rejection"
    )
    log_rate = torch.log((m - 1) / (draws - 1).double())  # (P,) log p̂, negative binomial: unbiased p̂
    kl = kl_estimate(uniform_log_weights(*rewards.shape).double(), rewards, post.beta,
                     torch.full((P,), R, dtype=torch.float64), log_rate)  # fmt: skip
    if m > n:  # n = 1: the first accepted sample (exact); the second only served the estimates
        cont = Continuations(cont.tokens[:, :n], cont.lengths[:, :n], cont.log_prob[:, :n], [t[:n] for t in cont.texts])
        log_prior, rewards = log_prior[:, :n], rewards[:, :n]
    log_weights = uniform_log_weights(*rewards.shape).double()
    rate = m / draws.double()
    return make_result(
        post, "rejection", prompts, cont,
        log_prior=log_prior, rewards=rewards, log_weights=log_weights, log_Z=log_rate + offset,
        kl=kl, exact_scale=True,
        info=RejectionInfo(acceptance_rate=rate, draws=draws, max_draws=cap, acceptances=m),
    )  # fmt: skip


def quasi_rejection_sampling(post, prompts, options: QRSOptions, *, n: int, max_new_tokens: int, generator, progress: bool = False):
    log_bound, proposal = options.log_bound, options.proposal  # None: the pilot's largest log-weight; the prior
    batch, cap = _batching(options, n)
    P = 1 if prompts is None else len(prompts)
    if log_bound is None:
        pilot = draw(post, prompts, batch, max_new_tokens, generator=generator, proposal=proposal)
        shift = reward_shift(pilot.rewards)  # (P,) c: weights are kept relative to exp(c/beta)
        offset = scaled(shift, post.beta)
        lw = pilot.relative_log_weights(post.beta, shift)  # (P, batch)
        bound = lw.amax(-1)  # (P,) relative log B
        for p in range(P):
            if math.isinf(float(bound[p])) and float(bound[p]) < 0:
                raise DegenerateWeightsError(
                    f"qrs: every one of the {batch} pilot draws of prompt {prompt_name(prompts, p)} has weight 0; "
                    "pass log_bound or relax the reward",
                    rows=[p],
                )
            if not math.isfinite(float(bound[p])):
                raise ValueError(
                    f"qrs: the pilot bound of prompt {prompt_name(prompts, p)} is {float(bound[p])} (a draw with "
                    "infinite weight: the proposal gives it probability 0 where the prior does not); pass a finite log_bound"
                )
    else:
        L = log_bound
        shift = torch.full((P,), post.beta * L, dtype=torch.float64)  # c = beta·log B, relative bound 0
        offset = scaled(shift, post.beta, what="beta·log_bound")
        bound = torch.zeros(P, dtype=torch.float64)

    def log_accept(d, rows):
        idx = torch.tensor(rows)
        lw = d.relative_log_weights(post.beta, shift[idx])  # (p, batch)
        return (lw - bound[idx, None]).clamp(max=0.0)  # log min(1, w/B)

    cont, log_prior, rewards, draws, seen_r, seen_ratio = _accept_until(
        post, prompts, n, max_new_tokens, generator, progress, proposal, batch, cap, log_accept, "qrs"
    )
    est, kl, log_Z = [], torch.empty(P, dtype=torch.float64), torch.empty(P, dtype=torch.float64)
    for p in range(P):
        lw = relative_log_weights(seen_r[p], post.beta, shift[p], seen_ratio[p])  # (D,) every proposal draw
        est.append(qrs_estimates(lw, float(bound[p])))
        stats = log_weight_stats(lw)
        kl[p] = kl_estimate(stats.log_weights, seen_r[p], post.beta, shift[p], stats.log_mean)
        log_Z[p] = offset[p] + stats.log_mean
    return make_result(
        post, "qrs", prompts, cont,
        log_prior=log_prior, rewards=rewards, log_weights=uniform_log_weights(*rewards.shape), log_Z=log_Z,
        kl=kl, exact_scale=True,
        info=QRSInfo(
            log_bound=offset + bound,
            acceptance_rate=torch.tensor([e["acceptance_rate"] for e in est], dtype=torch.float64),
            tv_estimate=torch.tensor([e["tv"] for e in est], dtype=torch.float64),
            kl_estimate=torch.tensor([e["kl"] for e in est], dtype=torch.float64),
            draws=draws,
            max_draws=cap,
        ),
    )  # fmt: skip


REJECTION = register(Method("rejection", RejectionOptions, RejectionInfo, rejection_sampling))
QRS = register(Method("qrs", QRSOptions, QRSInfo, quasi_rejection_sampling))


__all__ = ["QRSInfo", "RejectionInfo", "draws_needed", "qrs_estimates", "quasi_rejection_sampling", "rejection_sampling"]
