"""Pieces every sampler shares: drawing from a proposal with rewards, per-prompt weight
normalisation with errors that name the prompt, and assembling the result.

Weights are formed from reward differences (``posterior.diagnostics.tilt``): for each prompt,
with c the largest finite reward, log w_i = c/beta + (r_i - c)/beta + log pi0(x_i) - log q(x_i),
and c/beta is only added to the reported log Z. So normalised weights, ESS, log Z and
KL(pi*||pi0) stay exact at any magnitude of r/beta that float64 can hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from posterior.diagnostics.tilt import check_resolution, kl_estimate, relative_log_weights, reward_shift, scaled
from posterior.diagnostics.weights import WeightStats, check_log_weights, log_weight_stats
from posterior.errors import DegenerateWeightsError
from posterior.priors.base import NEXT_TOKEN, Continuations, Prior
from posterior.results import Info, SampleResult


@dataclass(frozen=True)
class Draws:
    """Proposal draws with everything a sampler needs. All (P, N) unless noted."""

    cont: Continuations  # tokens (P, N, T), lengths, texts; cont.log_prob is log q
    log_prior: torch.Tensor  # log pi0(x)
    log_q: torch.Tensor  # log q(x) of the proposal (the same tensor as log_prior when q is the prior)
    rewards: torch.Tensor  # r(x), float64
    support: str = "prior"  # how the proposal's support was checked against the prior's (see check_support)

    def log_ratio(self) -> torch.Tensor | None:
        """log pi0(x) - log q(x) in float64, or None when q is the prior (exactly 0)."""
        if self.log_q is self.log_prior:
            return None
        return self.log_prior.double() - self.log_q.double()

    def log_target(self, beta: float) -> torch.Tensor:
        """log pi0(x) + r(x)/beta, the unnormalised posterior (float64; absolute, so it rounds
        log pi0 away once |r/beta| is large: weights use :meth:`relative_log_weights`)."""
        return self.log_prior.double() + self.rewards / beta

    def log_weights(self, beta: float) -> torch.Tensor:
        """Importance log-weights of pi* against the proposal, r/beta + (log pi0 - log q), float64."""
        ratio = self.log_ratio()
        return self.rewards / beta if ratio is None else self.rewards / beta + ratio

    def relative_log_weights(self, beta: float, shift: torch.Tensor) -> torch.Tensor:
        """(r - shift)/beta + log pi0 - log q, float64 (P, N); ``shift`` (P,) in reward units."""
        return relative_log_weights(self.rewards, beta, shift, self.log_ratio())


class Tilted(NamedTuple):
    """Self-normalised importance weights of pi* for (P, N) draws, exact at any scale."""

    stats: WeightStats  # normalised log-weights (float64), ESS, log_mean = log Ẑ - shift/beta
    shift: torch.Tensor  # (P,) float64 the largest finite reward per prompt
    log_Z: torch.Tensor  # (P,) float64 log Ẑ = shift/beta + stats.log_mean
    kl: torch.Tensor  # (P,) float64 KL̂(pi*||pi0)


def tilted_weights(d: Draws, beta: float, prompts, *, what: str) -> Tilted:
    """Weights, log Ẑ and KL̂(pi*||pi0) of draws ``d`` (see the module docstring)."""
    shift = reward_shift(d.rewards)
    offset = scaled(shift, beta)
    stats = normalize_prompts(d.relative_log_weights(beta, shift), prompts, what=what)
    kl = kl_estimate(stats.log_weights, d.rewards, beta, shift, stats.log_mean)
    return Tilted(stats, shift, offset + stats.log_mean, kl)


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


def check_support(prior: Prior, q: Prior, prompt_ids, q_ids, cont: Continuations, prompts) -> str:
    """Raise ``ValueError`` where the proposal q gives probability 0 to a next token to which the
    prior gives positive probability, along the drawn continuations.

    Importance weights pi0/q only see sequences q can produce: where q has no mass and pi0 has,
    an estimate of pi* (and log Z) would be silently biased. Checked by teacher-forcing both
    priors along the draws (one extra decoding pass of each), except for a proposal whose support
    is full by construction (a transformers model without top-k / top-p). Returns how the support
    was established ("prior", "full", "checked", or why it was not checked), for ``res.info``.
    """
    if q is prior:
        return "prior"
    if q.full_support:
        return "full (softmax without top-k/top-p)"
    P, N, T = cont.tokens.shape
    for r in (prior, q):  # the check reads next-token distributions: step-wise priors only
        if not r.has(NEXT_TOKEN):
            return f"not checked ({type(r).__name__} gives sequences only, no next-token distributions)"
    try:
        ps, qs = prior.start(prompt_ids, copies=N), q.start(q_ids, copies=N)
    except NotImplementedError as e:
        return f"not checked ({type(q).__name__} has no decode state: {e})"
    flat, lengths = cont.tokens.reshape(P * N, T), cont.lengths.reshape(P * N)
    eos = set(prior.eos_token_ids)
    steps = int(lengths.max()) if lengths.numel() else 0
    for t in range(steps):
        lp, lq = ps.logprobs.float().cpu(), qs.logprobs.float().cpu()  # (B, V)
        miss = (lengths > t)[:, None] & torch.isfinite(lp) & torch.isneginf(lq)  # (B, V)
        if bool(miss.any()):
            b, v = miss.nonzero()[0].tolist()
            prefix = prior.decode([i for i in flat[b, :t].tolist() if i not in eos])
            token = "<EOS>" if v in eos else repr(prior.decode([v]))
            raise ValueError(
                f"proposal {type(q).__name__} gives probability 0 to token {token} after {prefix!r} "
                f"(prompt {prompt_name(prompts, b // N)}), where the prior gives it {lp[b, v].exp().item():.3g}: "
                "importance weights cannot see that part of pi*; use a proposal that covers the prior's "
                "support (no top_k / top_p) or the prior itself"
            )
        if t + 1 < steps:
            tok = flat[:, t]
            ps, qs = prior.extend(ps, tok.to(prior.device)), q.extend(qs, tok.to(q.device))
    return "checked along the draws"


def draw(post, prompts, n: int, max_new_tokens: int, *, generator, proposal: Prior | None = None, progress=False) -> Draws:
    """n draws per prompt from ``proposal`` (default the prior), scored under the prior, rewarded."""
    prior = post.prior
    q = prior if proposal is None else proposal
    check_proposal(prior, q)
    prompt_ids = prior.encode_prompts(prompts)
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    q_ids = prompt_ids if q is prior else q.encode_prompts(prompts)
    cont = q.sample(q_ids, n, max_new_tokens, generator=generator, progress=progress)
    if q is prior:
        return Draws(cont, cont.log_prob, cont.log_prob, post.rewards(cont.texts))
    support = check_support(prior, q, prompt_ids, q_ids, cont, prompts)
    log_prior = prior.log_prob(prompt_ids, cont.tokens, cont.lengths)
    return Draws(cont, log_prior, cont.log_prob, post.rewards(cont.texts), support)


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


def _check_finite(method: str, beta: float, log_Z, kl) -> None:
    """No result carries an infinite or NaN log Z or KL: weights that survived normalisation give
    finite ones, so a non-finite value can only be float64 overflow of r/beta."""
    for name, x in (("log Z", log_Z), ("KL(pi*||pi0)", kl)):
        if x is None:
            continue
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            p = int(bad.nonzero()[0])
            raise ValueError(
                f"r/beta overflows float64 for method {method!r} at beta={beta!r}: {name} of prompt #{p} is "
                f"{float(x[p])}; use a larger beta or rescale the reward"
            )


def make_result(post, method: str, prompts, cont: Continuations, *, log_prior, rewards, log_weights, log_Z,
                ess=None, targets_posterior=True, info=None, kl=None, exact_scale=False) -> SampleResult:
    """Assemble a :class:`SampleResult`.

    ``info`` is the method's typed info (a dict becomes an :class:`~posterior.results.Info`); its
    ``ess`` is set to the result's. ``kl`` (P,) is the sampler's own KL̂(pi*||pi0) (see :func:`tilted_weights`); without it, it is
    computed here from the float64 normalised weights and log Z. A sampler that formed its weights
    from reward differences passes ``exact_scale=True``; others (which add log pi0 to r/beta)
    are refused by :func:`~posterior.diagnostics.tilt.check_resolution` when |r/beta| is too large
    for float64 to resolve 1e-6 nats.
    """
    P, N = log_weights.shape
    log_Z = None if log_Z is None else log_Z.double()
    if not exact_scale:
        check_resolution(rewards, post.beta, log_Z, method=method)
    if kl is None and log_Z is not None and targets_posterior:
        shift = reward_shift(rewards)
        kl = kl_estimate(log_weights.double(), rewards, post.beta, shift, log_Z - scaled(shift, post.beta))
    _check_finite(method, post.beta, log_Z, kl)
    ess = torch.full((P,), float(N)) if ess is None else ess.float()
    info = (info if isinstance(info, Info) else Info.of(info)).replace(ess=ess)
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
        log_Z=log_Z,
        ess=ess,
        targets_posterior=targets_posterior,
        info=info,
        prior=post.prior.describe(),
        kl_prior=None if kl is None or not targets_posterior else kl.double(),
    )
