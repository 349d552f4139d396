"""Best-of-n and soft best-of-n: selection among ``best_of`` prior draws per output.

Best-of-n returns, for each of the n outputs, the highest-reward of ``best_of`` = k prior draws
(ties to the first). For distinct rewards its exact distribution is
P(x) = (F(x) + pi0(x))^k - F(x)^k with F(x) = pi0(r(X) < r(x)); KL(BoN || pi0) <= log k - (k-1)/k.

Soft best-of-n picks one of the k draws with probability softmax(r/beta); as k -> inf it tends to
pi* (Verdun et al. 2025, "Soft Best-of-n Sampling"). Neither targets pi* exactly at finite k, so
results carry uniform weights, ``targets_posterior=False`` and no log Z.
"""

from __future__ import annotations

import math

import torch

from posterior.errors import DegenerateWeightsError
from posterior.samplers.common import draw, make_result, prompt_name, select, uniform_log_weights
from posterior.samplers.registry import register_sampler


def _check_best_of(best_of):
    if isinstance(best_of, bool) or not isinstance(best_of, int) or best_of < 1:
        raise ValueError(f"best_of must be a positive int, got {best_of!r}")


@register_sampler("bon")
def best_of_n(post, prompts, *, n: int, max_new_tokens: int, generator, progress: bool = False, best_of: int = 4):
    _check_best_of(best_of)
    d = draw(post, prompts, n * best_of, max_new_tokens, generator=generator, progress=progress)
    P = d.rewards.shape[0]
    groups = d.rewards.view(P, n, best_of)  # (P, n, k)
    pick = torch.arange(n)[None, :] * best_of + groups.argmax(-1)  # (P, n) first max in each group
    cont, (log_prior, rewards) = select(d.cont, pick, d.log_prior, d.rewards)
    return make_result(
        post, "bon", prompts, cont,
        log_prior=log_prior, rewards=rewards, log_weights=uniform_log_weights(P, n), log_Z=None,
        targets_posterior=False,
        info={"best_of": best_of, "kl_bound": math.log(best_of) - (best_of - 1) / best_of},
    )


@register_sampler("soft_bon")
def soft_best_of_n(post, prompts, *, n: int, max_new_tokens: int, generator, progress: bool = False, best_of: int = 4):
    _check_best_of(best_of)
    d = draw(post, prompts, n * best_of, max_new_tokens, generator=generator, progress=progress)
    P = d.rewards.shape[0]
    logits = (d.rewards / post.beta).view(P * n, best_of)  # (P·n, k)
    dead = torch.isneginf(logits).all(-1)
    if bool(dead.any()):
        g = int(dead.nonzero()[0])
        raise DegenerateWeightsError(
            f"soft_bon: all {best_of} draws of output {g % n} of prompt {prompt_name(prompts, g // n)} have reward -inf",
            rows=[g // n],
        )
    probs = torch.softmax(logits, -1).to(generator.device)
    choice = torch.multinomial(probs, 1, generator=generator).view(P, n).cpu()
    pick = torch.arange(n)[None, :] * best_of + choice
    cont, (log_prior, rewards) = select(d.cont, pick, d.log_prior, d.rewards)
    return make_result(
        post, "soft_bon", prompts, cont,
        log_prior=log_prior, rewards=rewards, log_weights=uniform_log_weights(P, n), log_Z=None,
        targets_posterior=False, info={"best_of": best_of},
    )
