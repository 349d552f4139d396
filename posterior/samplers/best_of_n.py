"""Best-of-n and soft best-of-n: selection among ``best_of`` prior draws per output.

Best-of-n returns, for each of the n outputs, the highest-reward of ``best_of`` = k prior draws
(ties to the first). For distinct rewards its exact distribution is
P(x) = (F(x) + pi0(x))^k - F(x)^k with F(x) = pi0(r(X) < r(x)); KL(BoN || pi0) <= log k - (k-1)/k.

Soft best-of-n picks one of the k draws with probability softmax(r/beta); as k -> inf it tends to
pi* (Verdun et al. 2025, "Soft Best-of-n Sampling"). The softmax is taken over reward differences
(r - max r)/beta, so it is exact at any beta. Neither targets pi* exactly at finite k, so results
carry uniform weights, ``targets_posterior=False`` and no log Z. A group whose k rewards are all
-inf has nothing to select: both raise :class:`~posterior.errors.DegenerateWeightsError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posterior.errors import DegenerateWeightsError
from posterior.results import Info
from posterior.samplers.common import draw, make_result, prompt_name, select, uniform_log_weights
from posterior.samplers.options import BoNOptions, SoftBoNOptions
from posterior.samplers.registry import Method, register
from posterior.streams import categorical, repeat


@dataclass(frozen=True, eq=False)
class BoNInfo(Info):
    """``res.info`` of ``method="bon"`` and ``"soft_bon"``."""

    best_of: int | None = None  # k, prior draws per output
    kl_bound: float | None = None  # bon: KL(BoN || pi0) <= log k - (k-1)/k


def _groups(method: str, post, prompts, n: int, best_of: int, max_new_tokens: int, generator, progress):
    """n·k prior draws per prompt, rewards grouped (P, n, k); every group has a finite reward."""
    d = draw(post, prompts, n * best_of, max_new_tokens, generator=generator, progress=progress)
    P = d.rewards.shape[0]
    groups = d.rewards.view(P, n, best_of)  # (P, n, k)
    dead = torch.isneginf(groups).all(-1)  # (P, n)
    if bool(dead.any()):
        p, g = dead.nonzero()[0].tolist()
        raise DegenerateWeightsError(
            f"{method}: all {best_of} draws of output {g} of prompt {prompt_name(prompts, p)} have reward -inf "
            f"({int(dead[p].sum())} of {n} outputs have no valid draw); raise best_of or relax the constraint",
            rows=sorted(set(dead.nonzero()[:, 0].tolist())),
        )
    return d, groups, best_of


def best_of_n(post, prompts, options: BoNOptions, *, n: int, max_new_tokens: int, generator, progress: bool = False):
    d, groups, best_of = _groups("bon", post, prompts, n, options.best_of, max_new_tokens, generator, progress)
    P = groups.shape[0]
    pick = torch.arange(n)[None, :] * best_of + groups.argmax(-1)  # (P, n) first max in each group
    cont, (log_prior, rewards) = select(d.cont, pick, d.log_prior, d.rewards)
    return make_result(
        post, "bon", prompts, cont,
        log_prior=log_prior, rewards=rewards, log_weights=uniform_log_weights(P, n), log_Z=None,
        targets_posterior=False, exact_scale=True,
        info=BoNInfo(best_of=best_of, kl_bound=math.log(best_of) - (best_of - 1) / best_of),
    )  # fmt: skip


def soft_best_of_n(post, prompts, options: SoftBoNOptions, *, n: int, max_new_tokens: int, generator, progress: bool = False):
    d, groups, best_of = _groups("soft_bon", post, prompts, n, options.best_of, max_new_tokens, generator, progress)
    P = groups.shape[0]
    logits = ((groups - groups.amax(-1, keepdim=True)) / post.beta).view(P * n, best_of)  # (P·n, k) max 0
    probs = torch.softmax(logits, -1).to(generator.device)
    choice = categorical(probs, repeat(generator, n)).view(P, n).cpu()  # per-prompt streams: n children of each
    pick = torch.arange(n)[None, :] * best_of + choice
    cont, (log_prior, rewards) = select(d.cont, pick, d.log_prior, d.rewards)
    return make_result(
        post, "soft_bon", prompts, cont,
        log_prior=log_prior, rewards=rewards, log_weights=uniform_log_weights(P, n), log_Z=None,
        targets_posterior=False, exact_scale=True, info=BoNInfo(best_of=best_of),
    )  # fmt: skip


BON = register(Method("bon", BoNOptions, BoNInfo, best_of_n, streams=True))
SOFT_BON = register(Method("soft_bon", SoftBoNOptions, BoNInfo, soft_best_of_n, streams=True))
