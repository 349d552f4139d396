"""Exact posteriors of small priors, by enumerating every continuation.

For a prior whose support (sequences ending at EOS or after ``max_new_tokens`` tokens) is small,

    log Z   = logsumexp_x [log pi0(x) + r(x)/beta]
    pi*(x)  = exp(log pi0(x) + r(x)/beta - log Z)

Both are formed from reward differences, as in :mod:`posterior.diagnostics.tilt`: with c the
largest finite reward, l(x) = log pi0(x) + (r(x) - c)/beta, log pi*(x) = l(x) - logsumexp l and
log Z = c/beta + logsumexp l. Forming r/beta first would round log pi0 away once |r/beta| outgrows
float64's resolution (beta = 1e-17 gave a pi* summing to 13); the differences are exact at every
beta, and only log Z needs c/beta, which raises a ``ValueError`` where it overflows float64.

This is the ground truth every sampler is tested against. Sequences are keyed by their token
tuple (EOS included when present), since distinct token sequences may share a text.

Whether a prior can be enumerated is answered here once (:func:`enumerable`): it walks next-token
distributions (the ``NEXT_TOKEN`` capability) and its support is small. ``compare`` and
``overoptimization`` ask it before computing exact rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from posterior.diagnostics.tilt import reward_shift, scaled
from posterior.priors.base import NEXT_TOKEN, Prior
from posterior.rewards.base import as_reward
from posterior.validate import check_real


@dataclass(frozen=True)
class ExactPosterior:
    sequences: list[tuple[int, ...]]  # every continuation in the support
    texts: list[str]
    log_prior: torch.Tensor  # (S,) float64 log pi0(x)
    rewards: torch.Tensor  # (S,) float64
    log_posterior: torch.Tensor  # (S,) float64 log pi*(x)
    log_Z: float

    def prob(self, which: str = "posterior") -> dict[tuple[int, ...], float]:
        lp = self.log_posterior if which == "posterior" else self.log_prior
        return dict(zip(self.sequences, lp.exp().tolist()))

    @property
    def kl(self) -> float:
        """KL(pi* || pi0) = E_pi*[r]/beta - log Z, computed exactly."""
        p = self.log_posterior.exp()
        return float((p * (self.log_posterior - self.log_prior)).nansum())


def support_size(prior: Prior, max_new_tokens: int) -> int:
    """The number of continuations of one prompt when every token has positive probability (an
    upper bound otherwise): W non-EOS tokens, E EOS tokens, T = max_new_tokens,
    sum_{t<T} W^t·E (ended by EOS) + W^T (cut at T tokens)."""
    E = len(set(prior.eos_token_ids))
    W = prior.vocab_size - E
    return E * sum(W**t for t in range(max_new_tokens)) + W**max_new_tokens


def enumerable(prior: Prior, max_new_tokens: int, *, limit: int = 200_000) -> bool:
    """Whether :func:`enumerate_continuations` can list ``prior``'s support: the prior gives
    next-token distributions (``NEXT_TOKEN``) and :func:`support_size` is at most ``limit``."""
    return prior.has(NEXT_TOKEN) and support_size(prior, max_new_tokens) <= limit


def enumerate_continuations(
    prior: Prior, max_new_tokens: int, prompt: str | None = None, *, max_sequences: int = 200_000
) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Every continuation of ``prompt`` with its log pi0, breadth first (one batched call per depth)."""
    if not prior.has(NEXT_TOKEN):
        raise ValueError(
            f"enumerating a prior's support walks its next-token distributions; {type(prior).__name__} has no "
            f"{NEXT_TOKEN!r} capability (use a step-wise prior: HFPrior, CallablePrior)"
        )
    prompt_ids = prior.encode_prompts(None if prompt is None else [prompt])
    eos = set(prior.eos_token_ids)
    state = prior.start(prompt_ids, copies=1)
    prefixes: list[tuple[int, ...]] = [()]
    prefix_lp = torch.zeros(1, dtype=torch.float64)
    done_seqs: list[tuple[int, ...]] = []
    done_lp: list[float] = []
    for t in range(max_new_tokens):
        lp = state.logprobs.double()  # (B, V)
        cand = prefix_lp[:, None] + lp  # (B, V)
        finite = torch.isfinite(cand)
        rows, toks = finite.nonzero(as_tuple=True)
        keep_rows, keep_toks = [], []
        for r, v in zip(rows.tolist(), toks.tolist()):
            seq = prefixes[r] + (v,)
            if v in eos or t + 1 == max_new_tokens:
                done_seqs.append(seq)
                done_lp.append(float(cand[r, v]))
            else:
                keep_rows.append(r)
                keep_toks.append(v)
        if len(done_seqs) + len(keep_rows) > max_sequences:
            raise ValueError(f"support exceeds max_sequences={max_sequences}; use a smaller prior or max_new_tokens")
        if not keep_rows:
            break
        idx = torch.tensor(keep_rows)
        state = prior.extend(prior.select(state, idx.to(prior.device)), torch.tensor(keep_toks, device=prior.device))
        prefixes = [prefixes[r] + (v,) for r, v in zip(keep_rows, keep_toks)]
        prefix_lp = cand[idx, torch.tensor(keep_toks)]
    return done_seqs, torch.tensor(done_lp, dtype=torch.float64)


def exact_posterior(prior: Prior, reward, beta: float, max_new_tokens: int, prompt: str | None = None) -> ExactPosterior:
    """Enumerate the posterior pi*(x) ∝ pi0(x) exp(r(x)/beta) of ``prompt``'s continuations."""
    beta = check_real("beta", beta, positive=True)
    seqs, log_prior = enumerate_continuations(prior, max_new_tokens, prompt)
    eos = set(prior.eos_token_ids)
    texts = [prior.decode([i for i in s if i not in eos]) for s in seqs]
    rewards = as_reward(reward)(texts)
    shift = reward_shift(rewards)  # c, the largest finite reward (a 0-dim tensor)
    log_joint = log_prior + (rewards - shift) / beta  # (S,) log pi0 + (r - c)/beta: exact at any beta
    log_Z_rel = torch.logsumexp(log_joint, 0)
    if torch.isneginf(log_Z_rel):
        raise ValueError("the posterior is empty: every continuation has reward -inf")
    log_Z = scaled(shift, beta, what="the largest reward") + log_Z_rel
    return ExactPosterior(seqs, texts, log_prior, rewards, log_joint - log_Z_rel, float(log_Z))


def sequence_keys(tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[tuple[int, ...]]]:
    """Token tuples of (P, N, T) continuations, truncated at their lengths."""
    return [[tuple(seq[:L]) for seq, L in zip(rt, rl)] for rt, rl in zip(tokens.tolist(), lengths.tolist())]


def empirical(keys: Sequence[tuple[int, ...]], log_weights: torch.Tensor | None = None) -> dict[tuple[int, ...], float]:
    """The (weighted) empirical distribution of one prompt's samples."""
    w = torch.full((len(keys),), 1.0 / len(keys), dtype=torch.float64) if log_weights is None else log_weights.double().softmax(0)
    out: dict[tuple[int, ...], float] = {}
    for k, wi in zip(keys, w.tolist()):
        out[k] = out.get(k, 0.0) + wi
    return out


def total_variation(p: dict, q: dict) -> float:
    """TV(p, q) = 1/2 sum_x |p(x) - q(x)| over the union of supports."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))
