"""Rejection sampling and quasi-rejection sampling (QRS) of pi*.

Rejection (exact). With a bound R >= r(x) for all x, draw x ~ pi0 and accept with probability
exp((r(x) - R)/beta) <= 1. Accepted draws are exact samples of pi*; the acceptance probability is
Z·exp(-R/beta), so with A acceptances after D draws (stopping at the n-th acceptance, a negative
binomial count) Ẑ = exp(R/beta)·(A - 1)/(D - 1) is unbiased.

QRS (Eikema, Kruszewski, Dance, Aziz & Dymetman 2022). For a proposal q, unnormalised target
P(x) = pi0(x) exp(r(x)/beta), log-weight log w = log P - log q and a constant B = exp(log_bound),
accept x ~ q with probability min(1, w/B). Accepted draws follow p_B(x) ∝ min(q(x)·B, P(x)), which
tends to pi* as B grows (exactly pi* once B >= max w) while the acceptance rate AR = E_q[min(w,B)]/B
falls. From the same draws, with Ẑ = mean w and Ẑ_B = mean min(w, B):

    TV(pi*, p_B) ≈ 1/2 · mean |w/Ẑ - min(w,B)/Ẑ_B|
    KL(pi* || p_B) ≈ mean (w/Ẑ) · [log(w / min(w,B)) + log(Ẑ_B / Ẑ)]
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from posterior.errors import DegenerateWeightsError
from posterior.priors.base import Continuations, Prior
from posterior.samplers.common import draw, make_result, prompt_name, uniform_log_weights
from posterior.samplers.registry import register_sampler


def _accept_until(post, prompts, n, max_new_tokens, generator, progress, proposal, batch_size, max_draws, log_accept, what):
    """Draw batches from the proposal, accept each draw with probability exp(log_accept(draws)),
    until every prompt has n acceptances. Returns the accepted samples and, per prompt, the
    number of draws up to (and including) the n-th acceptance, plus every draw's log-weight."""
    P = 1 if prompts is None else len(prompts)
    batch = batch_size or n
    accepted: list[list[tuple]] = [[] for _ in range(P)]  # (tokens, length, text, log_prior, reward)
    draws_used = [0] * P
    all_log_w: list[list[torch.Tensor]] = [[] for _ in range(P)]
    todo = list(range(P))
    bar = tqdm(total=P * n, desc=what, unit="sample", disable=not progress, leave=False)
    while todo:
        sub = None if prompts is None else [prompts[p] for p in todo]
        d = draw(post, sub, batch, max_new_tokens, generator=generator, proposal=proposal)
        log_acc = log_accept(d)  # (p, batch) float64
        u = torch.rand(log_acc.shape, generator=generator, dtype=torch.float64, device=generator.device).cpu()
        acc = torch.log(u) < log_acc
        log_w = d.log_weights(post.beta)
        still = []
        for j, p in enumerate(todo):
            all_log_w[p].append(log_w[j])
            for i in range(batch):
                draws_used[p] += 1
                if acc[j, i]:
                    accepted[p].append((d.cont.tokens[j, i], d.cont.lengths[j, i], d.cont.texts[j][i], d.log_prior[j, i], d.rewards[j, i]))
                    bar.update(1)
                    if len(accepted[p]) == n:
                        break
            if len(accepted[p]) < n:
                if draws_used[p] >= max_draws:
                    bar.close()
                    raise DegenerateWeightsError(
                        f"{what}: prompt {prompt_name(prompts, p)} accepted {len(accepted[p])} of {draws_used[p]} "
                        f"draws, short of n={n} within max_draws={max_draws}; raise max_draws or the bound",
                        rows=[p],
                    )
                still.append(p)
        todo = still
    bar.close()
    # Draw batches are as wide as their longest draw: pad every accepted sequence to the widest.
    width = max(int(a[1]) for acc_p in accepted for a in acc_p)
    pad = post.prior.eos_token_ids[0]
    tokens = torch.stack([
        torch.stack([torch.nn.functional.pad(a[0][:width], (0, width - min(width, a[0].shape[0])), value=pad) for a in acc_p])
        for acc_p in accepted
    ])  # fmt: skip
    lengths = torch.stack([torch.stack([a[1] for a in acc_p]) for acc_p in accepted])
    texts = [[a[2] for a in acc_p] for acc_p in accepted]
    log_prior = torch.stack([torch.stack([a[3] for a in acc_p]) for acc_p in accepted])
    rewards = torch.stack([torch.stack([a[4] for a in acc_p]) for acc_p in accepted])
    cont = Continuations(tokens, lengths, log_prior, texts)
    return cont, log_prior, rewards, torch.tensor(draws_used), [torch.cat(w) for w in all_log_w]


@register_sampler("rejection")
def rejection_sampling(
    post,
    prompts,
    *,
    n: int,
    max_new_tokens: int,
    generator,
    progress: bool = False,
    reward_upper_bound: float | None = None,  # R >= r(x) for every x (required)
    batch_size: int | None = None,  # prior draws per prompt per round (default n)
    max_draws: int = 100_000,  # per prompt, before giving up with an error
):
    if reward_upper_bound is None or not math.isfinite(reward_upper_bound):
        raise ValueError(
            f"rejection sampling needs a finite reward_upper_bound >= every reward, got {reward_upper_bound!r} "
            "(e.g. 1.0 for Sentiment, 0.0 for Contains)"
        )
    R = float(reward_upper_bound)

    def log_accept(d):
        over = d.rewards > R
        if bool(over.any()):
            j, i = over.nonzero()[0].tolist()
            raise ValueError(
                f"reward_upper_bound={R} is not an upper bound: reward {d.rewards[j, i].item():.6g} "
                f"for text {d.cont.texts[j][i]!r}"
            )
        return (d.rewards - R) / post.beta

    cont, log_prior, rewards, draws, _ = _accept_until(
        post, prompts, n, max_new_tokens, generator, progress, None, batch_size, max_draws, log_accept, "rejection"
    )
    rate = (n - 1) / (draws - 1).clamp(min=1).double() if n > 1 else n / draws.double()
    return make_result(
        post, "rejection", prompts, cont,
        log_prior=log_prior, rewards=rewards, log_weights=uniform_log_weights(*rewards.shape),
        log_Z=torch.log(rate) + R / post.beta,
        info={"acceptance_rate": n / draws.double(), "draws": draws},
    )


@register_sampler("qrs")
def quasi_rejection_sampling(
    post,
    prompts,
    *,
    n: int,
    max_new_tokens: int,
    generator,
    progress: bool = False,
    log_bound: float | None = None,  # log B; default: the largest log-weight of a pilot batch
    proposal: Prior | None = None,  # default: the prior
    batch_size: int | None = None,  # proposal draws per prompt per round (default n)
    max_draws: int = 100_000,
):
    if log_bound is None:
        pilot = draw(post, prompts, batch_size or n, max_new_tokens, generator=generator, proposal=proposal)
        lw = pilot.log_weights(post.beta)
        if bool(torch.isneginf(lw).all()):
            raise DegenerateWeightsError("qrs: every pilot draw has weight 0; pass log_bound or relax the reward")
        log_bound = float(lw.max())
    elif not math.isfinite(log_bound):
        raise ValueError(f"log_bound must be finite, got {log_bound!r}")

    def log_accept(d):
        return (d.log_weights(post.beta) - log_bound).clamp(max=0.0)  # log min(1, w/B)

    cont, log_prior, rewards, draws, log_w = _accept_until(
        post, prompts, n, max_new_tokens, generator, progress, proposal, batch_size, max_draws, log_accept, "qrs"
    )
    est = [qrs_estimates(w, log_bound) for w in log_w]
    return make_result(
        post, "qrs", prompts, cont,
        log_prior=log_prior, rewards=rewards, log_weights=uniform_log_weights(*rewards.shape),
        log_Z=torch.tensor([e["log_Z"] for e in est]),
        info={
            "log_bound": log_bound,
            "acceptance_rate": torch.tensor([e["acceptance_rate"] for e in est]),
            "tv_estimate": torch.tensor([e["tv"] for e in est]),
            "kl_estimate": torch.tensor([e["kl"] for e in est]),
            "draws": draws,
        },
    )


def qrs_estimates(log_w: torch.Tensor, log_bound: float) -> dict[str, float]:
    """QRS diagnostics from proposal draws' log-weights (see the module docstring)."""
    log_w = log_w.double()
    N = log_w.shape[0]
    log_m = torch.minimum(log_w, torch.tensor(log_bound, dtype=torch.float64))  # log min(w, B)
    log_Z = torch.logsumexp(log_w, 0) - math.log(N)
    log_ZB = torch.logsumexp(log_m, 0) - math.log(N)
    p = torch.exp(log_w - log_Z)  # w / Ẑ
    pB = torch.exp(log_m - log_ZB)  # min(w, B) / Ẑ_B
    tv = 0.5 * (p - pB).abs().mean()
    kl_terms = torch.where(p > 0, p * (log_w - log_m + log_ZB - log_Z), 0.0)
    return {
        "log_Z": float(log_Z),
        "acceptance_rate": float(torch.exp(log_ZB - log_bound)),
        "tv": float(tv),
        "kl": float(kl_terms.mean()),
    }
