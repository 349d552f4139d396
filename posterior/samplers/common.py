"""Pieces every sampler shares: drawing from a proposal with rewards, per-prompt weight
normalisation with errors that name the prompt, and assembling the result."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posterior.diagnostics.weights import WeightStats, check_log_weights, log_weight_stats
from posterior.errors import DegenerateWeightsError
from posterior.priors.base import Continuations, Prior
from posterior.results import SampleResult


@dataclass(frozen=True)
class Draws:
    """Proposal draws with everything a sampler needs. All (P, N) unless noted."""

    cont: Continuations  # tokens (P, N, T), lengths, texts; cont.log_prob is log q
    log_prior: torch.Tensor  # log pi0(x)
    log_q: torch.Tensor  # log q(x) of the proposal (== log_prior when q is the prior)
    rewards: torch.Tensor  # r(x), float64

    def log_target(self, beta: float) -> torch.Tensor:
        """log pi0(x) + r(x)/beta, the unnormalised posterior (float64)."""
        return self.log_prior.double() + self.rewards / beta

    def log_weights(self, beta: float) -> torch.Tensor:
        """Importance log-weights of pi* against the proposal: log pi0 + r/beta - log q."""
        return self.log_target(beta) - self.log_q.double()


def prompt_name(prompts: list[str] | None, p: int) -> str:
    return "<unconditional>" if prompts is None else repr(prompts[p][:80])


def check_proposal(prior: Prior, proposal: Prior) -> None:
    """A proposal must share the prior's token ids: densities are over the same sequences."""
    if proposal is prior:
        return
    if not isinstance(proposal, Prior):
        raise ValueError(f"proposal must be a posterior prior (HFPrior, CallablePrior), got {proposal!r}")
    if proposal.vocabulary_key() is None or proposal.vocabulary_key() != prior.vocabulary_key():
        raise ValueError(
            f"proposal {type(proposal).__name__} has a different tokenizer/vocabulary from the prior "
            f"{type(prior).__name__}; importance weights need both densities over the same token sequences"
        )
    if tuple(proposal.eos_token_ids) != tuple(prior.eos_token_ids):
        raise ValueError(f"proposal EOS ids {proposal.eos_token_ids} differ from the prior's {prior.eos_token_ids}")


def draw(post, prompts, n: int, max_new_tokens: int, *, generator, proposal: Prior | None = None, progress=False) -> Draws:
    """n draws per prompt from ``proposal`` (default the prior), scored under the prior, rewarded."""
    prior = post.prior
    q = prior if proposal is None else proposal
    check_proposal(prior, q)
    prompt_ids = prior.encode_prompts(prompts)
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    q_ids = prompt_ids if q is prior else q.encode_prompts(prompts)
    cont = q.sample(q_ids, n, max_new_tokens, generator=generator, progress=progress)
    log_prior = cont.log_prob if q is prior else prior.log_prob(prompt_ids, cont.tokens, cont.lengths)
    return Draws(cont, log_prior, cont.log_prob, post.rewards(cont.texts))


def normalize_prompts(log_weights: torch.Tensor, prompts: list[str] | None, *, what: str) -> WeightStats:
    """Normalise (P, N) log-weights per prompt; all -inf for a prompt raises naming the prompt."""
    check_log_weights(log_weights, what=what)
    stats = log_weight_stats(log_weights)
    if bool(stats.degenerate.any()):
        rows = stats.degenerate.nonzero().flatten().tolist()
        names = ", ".join(prompt_name(prompts, p) for p in rows)
        raise DegenerateWeightsError(
            f"{what}: every one of the {log_weights.shape[1]} samples of prompt(s) {names} has weight 0 "
            "(log-weight -inf, e.g. every reward -inf); draw more samples or relax the constraint",
            rows=rows,
        )
    return stats


def uniform_log_weights(P: int, N: int) -> torch.Tensor:
    return torch.full((P, N), -torch.log(torch.tensor(float(N))).item())


def select(cont: Continuations, idx: torch.Tensor, *tensors: torch.Tensor):
    """Gather samples ``idx`` (P, M) along the sample axis of continuations and (P, N) tensors."""
    tokens = cont.tokens.gather(1, idx[..., None].expand(-1, -1, cont.tokens.shape[-1]))
    lengths = cont.lengths.gather(1, idx)
    texts = [[row[i] for i in ix] for row, ix in zip(cont.texts, idx.tolist())]
    picked = [t.gather(1, idx) for t in tensors]
    return Continuations(tokens, lengths, cont.log_prob.gather(1, idx), texts), picked


def make_result(post, method: str, prompts, cont: Continuations, *, log_prior, rewards, log_weights, log_Z,
                ess=None, targets_posterior=True, info=None) -> SampleResult:
    P, N = log_weights.shape
    return SampleResult(
        method=method,
        beta=post.beta,
        prompts=None if prompts is None else list(prompts),
        texts=cont.texts,
        tokens=cont.tokens,
        lengths=cont.lengths,
        log_weights=log_weights.float(),
        rewards=rewards,
        log_prior=log_prior.float(),
        log_Z=None if log_Z is None else log_Z.double(),
        ess=torch.full((P,), float(N)) if ess is None else ess.float(),
        targets_posterior=targets_posterior,
        info=dict(info or {}),
        prior=post.prior.describe(),
    )
