"""Metropolis–Hastings over whole continuations (``method="mh"``).

Target pi*(x) ∝ pi0(x) exp(r(x)/beta) over continuations x (ending at EOS or after M =
``max_new_tokens`` tokens, EOS counted; L_x = |x|). From the current x, propose y ~ q(. | x) and
accept with probability (Metropolis et al. 1953; Hastings 1970)

    alpha(x, y) = min(1, [pi*(y) q(x | y)] / [pi*(x) q(y | x)]).

Moves (``move=``):

* ``"independence"``: y ~ pi0, a fresh prior draw. q(y | x) = pi0(y), so the prior terms cancel:

      log alpha = min(0, (r(y) - r(x)) / beta).

* ``"suffix"`` (default; QUEST, Faria et al. 2024; used for test-time alignment in QAlign, Faria &
  Smith 2025): draw a cut c ~ Uniform{0, ..., L_x - 1}, keep the prefix x_<c and regenerate the
  rest from the prior, y = x_<c ++ z with z ~ pi0(. | prompt, x_<c) (at least one new token, so
  L_y >= c + 1). The cut is part of the move: from y, the same cut c has probability 1/L_y and
  regenerates x_>=c, so the forward and reverse densities of the move are

      q_c(y | x) = (1/L_x) pi0(y_>=c | y_<c),        q_c(x | y) = (1/L_y) pi0(x_>=c | x_<c).

  With pi0(x) = pi0(x_<c) pi0(x_>=c | x_<c), the same for y, and y_<c = x_<c, the prior terms
  cancel and a length ratio remains:

      alpha_c = min(1, [pi0(y) e^{r(y)/beta} (1/L_y) pi0(x_>=c|x_<c)] / [pi0(x) e^{r(x)/beta} (1/L_x) pi0(y_>=c|y_<c)])
              = min(1, exp((r(y) - r(x)) / beta) · L_x / L_y).

  Detailed balance holds for every c on its own, pi*(x) q_c(y|x) alpha_c(x,y) =
  min(pi*(x) q_c(y|x), pi*(y) q_c(x|y)) = pi*(y) q_c(x|y) alpha_c(y,x), so it holds for the kernel
  K(x, y) = sum_c q_c(y|x) alpha_c(x,y) (y != x) as well. The L_x/L_y factor is the correction for
  the state-dependent cut distribution; leaving it out biases the chain towards long sequences.
  (Using the marginal density sum_c q_c(y|x) instead would also be valid, and accept at least as
  often, but needs the prior probability of every common prefix; we use the per-cut ratio, as
  QUEST does.)

* ``"mixture"``: with probability ``mixture_weight`` an independence step, otherwise a suffix
  step. The component is chosen independently of the state, and each component kernel is
  reversible with respect to pi*, so the mixture w K_ind + (1 - w) K_suffix is too (Tierney 1994):
  each step is a plain MH step of the chosen component, with that component's densities.

A chain whose state is outside the support (reward -inf, or prior probability 0, e.g. a prior
draw that violates a hard constraint) accepts every move; once inside it never leaves.

Chains. ``n`` chains per prompt run as one batch over all prompts (rows prompt-major, tensors
``[P, N, ...]``), starting from prior draws or from ``init_texts`` (e.g. an SMC result's texts).
Each chain keeps the prior's decode state of its current sequence, so the suffix proposal reuses
the prefix's KV cache (``Prior.truncate``) instead of re-encoding it, and accept / reject picks
rows of two decode states (``Prior.merge_rows``). Priors without those (e.g. ``CallablePrior``)
re-encode the kept prefixes, which is exact but slower.

The result's samples are the chains' final states (``samples="final"``; uniform weights, no log Z,
``ess`` = number of final states with finite reward, the importance-sampling ESS of uniform
weights) or every kept state after ``burn_in``, every ``thin``-th counted back from the last
(``samples="all"``). Diagnostics in ``res.info``: ``acceptance_rate`` (P,) and
``acceptance_rate_per_chain`` (P, N) over all steps, ``acceptance_by_cut`` (P, bins) for suffix
moves binned by cut index (bins start at ``acceptance_by_cut_bins``), the split R-hat ``r_hat`` and
the autocorrelation effective sample size ``mcmc_ess`` (P,) of the kept reward traces (Gelman &
Rubin 1992; Geyer 1992; via ``pyro.ops.stats``) — ``mcmc_ess`` is the MCMC ESS, not the
importance-sampling ``ess`` — and ``reward_trace`` (P, steps + 1), the mean finite reward over
chains after each step (step 0: the initial states).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from posterior.priors.base import NEXT_TOKEN, PREFIX_CACHE, Continuations, DecodeState, Extension, Prior, decode_rows
from posterior.samplers.callbacks import StepReport
from posterior.samplers.common import make_result, normalize_prompts
from posterior.samplers.chains import ChainsInfo, run_chains
from posterior.samplers.options import MHOptions
from posterior.samplers.registry import Method, register
from posterior.validate import check_int

# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


class MHState(NamedTuple):
    """The chains: one current continuation per (prompt, chain)."""

    tokens: torch.Tensor  # (P, N, M) int64, EOS-padded after each length
    lengths: torch.Tensor  # (P, N) int64, EOS counted
    token_logprobs: torch.Tensor  # (P, N, M) float32 log pi0 of each token (0 after the length)
    rewards: torch.Tensor  # (P, N) float64
    texts: list[list[str]]  # [P][N]
    decode: DecodeState | None  # P·N rows that consumed prompt + x_<L-1 (at least); None: not kept

    @property
    def log_prior(self) -> torch.Tensor:
        """(P, N) float64 log pi0(x | prompt)."""
        return self.token_logprobs.double().sum(-1)

    def log_target(self, beta: float) -> torch.Tensor:
        """(P, N) float64 unnormalised log pi*(x) = log pi0(x) + r(x)/beta."""
        return self.log_prior + self.rewards / beta


class Proposal(NamedTuple):
    """Proposed continuations y with the move's densities. (P, N) unless noted."""

    tokens: torch.Tensor  # (P, N, M) int64
    lengths: torch.Tensor  # (P, N) int64
    token_logprobs: torch.Tensor  # (P, N, M) float32
    decode: DecodeState | None  # P·N rows for prompt + y
    cut: torch.Tensor  # (P, N) int64 tokens kept from x (0 for independence moves)
    independence: torch.Tensor  # (P, N) bool: move of the independence kernel
    log_q_forward: torch.Tensor  # (P, N) float64 log q(y | x) of the move
    log_q_reverse: torch.Tensor  # (P, N) float64 log q(x | y) of the reverse move


class StepInfo(NamedTuple):
    accepted: torch.Tensor  # (P, N) bool
    cut: torch.Tensor  # (P, N) int64
    independence: torch.Tensor  # (P, N) bool
    log_ratio: torch.Tensor  # (P, N) float64 log acceptance ratio (before the min with 0)


@dataclass(frozen=True)
class MHConfig:
    """What one MH step does (``move`` and ``mixture_weight`` as in :class:`MHOptions`)."""

    max_new_tokens: int  # M: longest continuation, EOS counted
    move: str = MHOptions.move
    mixture_weight: float = MHOptions.mixture_weight

    def __post_init__(self):
        MHOptions(move=self.move, mixture_weight=self.mixture_weight)  # the options' own checks
        check_int("max_new_tokens", self.max_new_tokens, 1)


# --------------------------------------------------------------------------------------------------
# Proposal schemes: choose, per chain, the kernel component and the cut
# --------------------------------------------------------------------------------------------------


def _uniform(shape, generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device).cpu()


def _uniform_cuts(lengths: torch.Tensor, generator) -> torch.Tensor:
    """c ~ Uniform{0, ..., L - 1} per chain: (P, N) -> (P, N) int64."""
    u = _uniform(lengths.shape, generator)
    return torch.minimum((u * lengths).floor().long(), lengths - 1)


def _choose_independence(lengths, mixture_weight, generator):
    return torch.zeros_like(lengths), torch.ones(lengths.shape, dtype=torch.bool)


def _choose_suffix(lengths, mixture_weight, generator):
    return _uniform_cuts(lengths, generator), torch.zeros(lengths.shape, dtype=torch.bool)


def _choose_mixture(lengths, mixture_weight, generator):
    independence = _uniform(lengths.shape, generator) < mixture_weight  # (P, N)
    cut = _uniform_cuts(lengths, generator)
    return torch.where(independence, 0, cut), independence


#: name -> fn(lengths (P, N), mixture_weight, generator) -> (cut (P, N), independence (P, N) bool)
MOVES: dict[str, Callable] = {
    "independence": _choose_independence,
    "suffix": _choose_suffix,
    "mixture": _choose_mixture,
}


def proposal_log_densities(
    token_logprobs_x: torch.Tensor,
    lengths_x: torch.Tensor,
    token_logprobs_y: torch.Tensor,
    lengths_y: torch.Tensor,
    cut: torch.Tensor,
    independence: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and reverse log densities of each chain's move.

    Independence moves: log q(y|x) = log pi0(y), log q(x|y) = log pi0(x). Suffix moves with cut c
    (uniform cut, see the module docstring): log q(y|x) = -log L_x + log pi0(y_>=c | y_<c) and
    log q(x|y) = -log L_y + log pi0(x_>=c | x_<c).

    Parameters
    ----------
    token_logprobs_x, token_logprobs_y : Tensor (P, N, M)
        Per-token log pi0 of the current and proposed sequences (0 after their lengths).
    lengths_x, lengths_y : LongTensor (P, N)
    cut : LongTensor (P, N)
        Tokens kept from x; y_<cut == x_<cut.
    independence : BoolTensor (P, N)

    Returns
    -------
    log_q_forward, log_q_reverse : Tensor (P, N) float64
    """
    lx, ly = token_logprobs_x.double(), token_logprobs_y.double()
    after = torch.arange(lx.shape[-1]) >= cut[..., None]  # (P, N, M) positions regenerated
    suffix_y = torch.where(after, ly, 0.0).sum(-1)  # (P, N) log pi0(y_>=c | y_<c)
    suffix_x = torch.where(after, lx, 0.0).sum(-1)
    fwd_suffix = suffix_y - lengths_x.double().log()
    rev_suffix = suffix_x - lengths_y.double().log()
    fwd = torch.where(independence, ly.sum(-1), fwd_suffix)
    rev = torch.where(independence, lx.sum(-1), rev_suffix)
    return fwd, rev


# --------------------------------------------------------------------------------------------------
# The three parts of an MH step
# --------------------------------------------------------------------------------------------------


def propose(
    prior: Prior,
    prompt_rows: Sequence[Sequence[int]],
    state: MHState,
    *,
    config: MHConfig,
    generator: torch.Generator,
) -> Proposal:
    """Propose y for every chain: choose cuts, regenerate the suffixes from the prior in one batch.

    Parameters
    ----------
    prior : Prior
    prompt_rows : list of P·N token-id lists
        The prompt of each chain (row p·N + i is chain i of prompt p).
    state : MHState
        Current chains; ``state.decode`` (if kept) supplies the prefixes' KV caches.
    config : MHConfig
    generator : torch.Generator

    Returns
    -------
    Proposal
        With the move's forward / reverse log densities, for :func:`log_acceptance_ratio`.
    """
    P, N, M = state.tokens.shape
    cut, independence = MOVES[config.move](state.lengths, config.mixture_weight, generator)  # (P, N)
    flat_cut = cut.reshape(P * N)
    y_tokens, y_lengths, y_lps, y_decode = _regenerate(
        prior, state.decode, prompt_rows, state.tokens.reshape(P * N, M), state.token_logprobs.reshape(P * N, M),
        flat_cut, generator=generator,
    )  # fmt: skip
    y_tokens, y_lengths, y_lps = y_tokens.view(P, N, M), y_lengths.view(P, N), y_lps.view(P, N, M)
    fwd, rev = proposal_log_densities(state.token_logprobs, state.lengths, y_lps, y_lengths, cut, independence)
    return Proposal(y_tokens, y_lengths, y_lps, y_decode, cut, independence, fwd, rev)


def log_acceptance_ratio(
    log_target_current: torch.Tensor,
    log_target_proposed: torch.Tensor,
    log_q_forward: torch.Tensor,
    log_q_reverse: torch.Tensor,
) -> torch.Tensor:
    """log [pi*(y) q(x|y)] - log [pi*(x) q(y|x)], elementwise (P, N) float64.

    Unnormalised log targets are fine (log Z cancels). A current state outside the support
    (log target -inf) gives +inf (move out; 0 if the proposal is outside too), a proposal outside
    the support -inf. Anything else that is not a number raises ``ValueError``.
    """
    cur, new = log_target_current.double(), log_target_proposed.double()
    ratio = (new - cur) + (log_q_reverse.double() - log_q_forward.double())
    out_cur, out_new = torch.isneginf(cur), torch.isneginf(new)
    ratio = torch.where(out_new, -math.inf, ratio)
    ratio = torch.where(out_cur, torch.where(out_new, 0.0, math.inf), ratio)
    if bool(torch.isnan(ratio).any()):
        i = torch.isnan(ratio).nonzero()[0].tolist()
        raise ValueError(
            f"log acceptance ratio is NaN at chain {i}: log targets {cur[tuple(i)].item()} -> {new[tuple(i)].item()}, "
            f"log q forward {log_q_forward[tuple(i)].item()}, reverse {log_q_reverse[tuple(i)].item()}"
        )
    return ratio


def accept(log_ratio: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Accept each move with probability min(1, exp(log_ratio)): log U < log_ratio, U ~ U[0, 1).

    (P, N) float64 -> (P, N) bool. Ratios >= 0 are always accepted, -inf never.
    """
    u = _uniform(log_ratio.shape, generator)
    return torch.log(u) < log_ratio


def merge(prior: Prior, take: torch.Tensor, proposed: MHState, current: MHState) -> MHState:
    """Chains where ``take`` (P, N) move to ``proposed``, the others stay at ``current``."""
    t3 = take[..., None]
    decode = None
    if proposed.decode is not None and current.decode is not None:
        decode = prior.merge_rows(take.reshape(-1).to(prior.device), proposed.decode, current.decode)
    texts = [[a if k else b for a, b, k in zip(ra, rb, rk)] for ra, rb, rk in zip(proposed.texts, current.texts, take.tolist())]
    return MHState(
        torch.where(t3, proposed.tokens, current.tokens),
        torch.where(take, proposed.lengths, current.lengths),
        torch.where(t3, proposed.token_logprobs, current.token_logprobs),
        torch.where(take, proposed.rewards, current.rewards),
        texts,
        decode,
    )


# --------------------------------------------------------------------------------------------------
# init + step
# --------------------------------------------------------------------------------------------------


def init(
    post,
    prompt_ids: list[list[int]],
    n: int,
    *,
    max_new_tokens: int,
    generator: torch.Generator,
    init_tokens: torch.Tensor | None = None,
    init_lengths: torch.Tensor | None = None,
) -> MHState:
    """Initial chains: n prior draws per prompt, or the given continuations (teacher-forced).

    Parameters
    ----------
    post : Posterior
    prompt_ids : list of P token-id lists
    n : int
        Chains per prompt.
    init_tokens : LongTensor (P, n, M), optional
        Given continuations (EOS-padded), with ``init_lengths`` (P, n).
    """
    prior = post.prior
    P, M = len(prompt_ids), max_new_tokens
    B = P * n
    pad = prior.eos_token_ids[0]
    decode = None
    if init_tokens is not None and not prior.has(NEXT_TOKEN):  # score the given texts
        tokens, lengths = init_tokens, init_lengths
        lps = prior.token_log_probs(prompt_ids, tokens, lengths).float()
    elif prior.has(NEXT_TOKEN):  # one decode (or teacher-forced) pass, keeping the KV cache
        forced = None if init_tokens is None else init_tokens.reshape(B, M)
        budget = torch.full((B,), M) if init_tokens is None else init_lengths.reshape(B)
        dec = decode_rows(prior, prior.start(prompt_ids, copies=n), budget, generator=generator,
                          forced=forced, keep_state=prior.has(PREFIX_CACHE))
        ext, decode = dec.extension, dec.state
        tokens, lengths, lps = _place(torch.full((B, M), pad), torch.zeros(B, M), torch.zeros(B, dtype=torch.long), ext, pad)
        tokens, lengths, lps = tokens.view(P, n, M), lengths.view(P, n), lps.view(P, n, M)
    else:  # sequence-level prior: n fresh draws per prompt, with per-token log-probabilities
        rows = [p for p in prompt_ids for _ in range(n)]
        ext = prior.continue_prefixes(rows, [[] for _ in rows], M, generator=generator)
        tokens, lengths, lps = _place(torch.full((B, M), pad), torch.zeros(B, M), torch.zeros(B, dtype=torch.long), ext, pad)
        tokens, lengths, lps = tokens.view(P, n, M), lengths.view(P, n), lps.view(P, n, M)
    texts = prior.texts_of(tokens, lengths)
    return MHState(tokens, lengths, lps.float(), post.rewards(texts), texts, decode)


def step(
    post,
    prompt_rows: Sequence[Sequence[int]],
    state: MHState,
    *,
    config: MHConfig,
    generator: torch.Generator,
) -> tuple[MHState, StepInfo]:
    """One MH step of every chain: propose, score, compute the log acceptance ratio, accept."""
    prior = post.prior
    prop = propose(prior, prompt_rows, state, config=config, generator=generator)
    texts = prior.texts_of(prop.tokens, prop.lengths)
    proposed = MHState(prop.tokens, prop.lengths, prop.token_logprobs, post.rewards(texts), texts, prop.decode)
    log_ratio = log_acceptance_ratio(state.log_target(post.beta), proposed.log_target(post.beta), prop.log_q_forward, prop.log_q_reverse)
    accepted = accept(log_ratio, generator=generator)
    return merge(prior, accepted, proposed, state), StepInfo(accepted, prop.cut, prop.independence, log_ratio)


def _place(tokens: torch.Tensor, token_logprobs: torch.Tensor, keep: torch.Tensor, ext: Extension, pad: int):
    """Rows ``tokens[b, :keep[b]]`` followed by ``ext``'s new tokens: tokens (B, M), lengths (B,),
    token log-probs (B, M), all on the CPU (new tokens past M are an error of the caller)."""
    B, M = tokens.shape
    K = ext.tokens.shape[1]
    keep = keep.cpu()
    new_tok, new_len, new_lp = ext.tokens.cpu(), ext.lengths.cpu(), ext.token_log_probs.detach().float().cpu()
    before = torch.arange(M)[None, :] < keep[:, None]  # (B, M) positions kept from x
    y = torch.where(before, tokens.cpu(), pad)
    lps = torch.where(before, token_logprobs.cpu().float(), 0.0)
    j = torch.arange(K)[None, :]  # (1, K)
    valid = j < new_len[:, None]  # (B, K)
    rows = torch.arange(B)[:, None].expand(B, K)
    pos = keep[:, None] + j  # (B, K) destination positions
    y[rows[valid], pos[valid]] = new_tok[valid]
    lps[rows[valid], pos[valid]] = new_lp[valid]
    return y, keep + new_len, lps


def _regenerate(prior: Prior, decode, prompt_rows, tokens, token_logprobs, keep, *, generator):
    """Keep ``tokens[b, :keep[b]]`` and regenerate the rest of every row from the prior, to EOS or
    M tokens. A step-wise prior continues from ``decode``'s KV cache (``truncate``) and, when it
    reuses prefix caches, returns the new rows' decode state; any other prior is asked for the
    suffixes with ``continue_prefixes``. Returns tokens (B, M), lengths (B,), token log-probs
    (B, M) and the decode state (or None)."""
    B, M = tokens.shape
    pad = prior.eos_token_ids[0]
    budget = M - keep.cpu()  # (B,) >= 1: cuts are < L <= M
    if prior.has(NEXT_TOKEN):
        start = prior.truncate(decode, prompt_rows, tokens, keep)
        dec = decode_rows(prior, start, budget, generator=generator, keep_state=decode is not None)
        ext, final = dec.extension, dec.state
    else:
        prefixes = [row[:k] for row, k in zip(tokens.tolist(), keep.tolist())]
        ext, final = prior.continue_prefixes(prompt_rows, prefixes, budget.tolist(), generator=generator), None
    y, lengths, lps = _place(tokens, token_logprobs, keep, ext, pad)
    return y, lengths, lps, final


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


def _rate(hits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch.where(counts > 0, hits / counts.clamp(min=1), math.nan)


@dataclass(frozen=True, repr=False)
class MHChains:
    """Every state of every chain (``return_chains=True``). Index 0 is the initial state."""

    tokens: torch.Tensor  # (S + 1, P, N, M) int64
    lengths: torch.Tensor  # (S + 1, P, N)
    log_prior: torch.Tensor  # (S + 1, P, N) float64
    rewards: torch.Tensor  # (S + 1, P, N) float64
    texts: list = field(default_factory=list)  # [S + 1][P][N]
    accepted: torch.Tensor | None = None  # (S, P, N) bool: step s + 1 accepted its proposal
    cut: torch.Tensor | None = None  # (S, P, N) int64 cut of step s + 1's proposal
    kept: tuple[int, ...] = ()  # state indices after burn-in and thinning

    def __repr__(self):
        S1, P, N, M = self.tokens.shape
        return f"MHChains(states={S1}, prompts={P}, chains={N}, max_new_tokens={M}, kept={len(self.kept)})"


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------


def _init_tokens(prior: Prior, init_texts, P: int, n: int, M: int):
    """[P][n] texts -> tokens (P, n, M), lengths (P, n); EOS appended when the text is shorter than M."""
    shape_ok = isinstance(init_texts, (list, tuple)) and len(init_texts) == P and all(
        isinstance(row, (list, tuple)) and len(row) == n for row in init_texts
    )
    if not shape_ok:
        got = f"{len(init_texts)} rows of lengths {[len(r) if isinstance(r, (list, tuple)) else type(r).__name__ for r in init_texts][:8]}" if isinstance(init_texts, (list, tuple)) else type(init_texts).__name__
        raise ValueError(f"init_texts must be [P][n] = [{P}][{n}] texts (one list of n per prompt); got {got}")
    eos = prior.eos_token_ids[0]
    tokens = torch.full((P, n, M), eos, dtype=torch.long)
    lengths = torch.zeros(P, n, dtype=torch.long)
    for p, row in enumerate(init_texts):
        for i, text in enumerate(row):
            if not isinstance(text, str):
                raise ValueError(f"init_texts[{p}][{i}] must be a str, got {type(text).__name__}: {text!r}")
            ids = prior.encode_text(text)
            if len(ids) > M:
                raise ValueError(f"init_texts[{p}][{i}] = {text[:60]!r} has {len(ids)} tokens > max_new_tokens={M}")
            if len(ids) < M:
                ids = ids + [eos]
            tokens[p, i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            lengths[p, i] = len(ids)
    return tokens, lengths


@dataclass(frozen=True, eq=False)
class MHInfo(ChainsInfo):
    """``res.info`` of ``method="mh"`` (with the chains' fields: steps, burn_in, thin, r_hat, mcmc_ess, reward_trace)."""

    move: str | None = None
    samples: str | None = None
    acceptance_rate: torch.Tensor | None = None  # (P,) over all steps and chains
    acceptance_rate_per_chain: torch.Tensor | None = None  # (P, N)
    acceptance_by_cut: torch.Tensor | None = None  # (P, bins) suffix moves by cut index; NaN where no move had such a cut
    acceptance_by_cut_bins: list | None = None  # first cut index of each bin
    mixture_weight: float | None = None  # move="mixture"
    acceptance_rate_independence: torch.Tensor | None = None  # (P,) move="mixture"
    acceptance_rate_suffix: torch.Tensor | None = None  # (P,) move="mixture"
    chains: MHChains | None = None  # return_chains=True


def run(post, prompts, options: MHOptions, *, n: int, max_new_tokens: int, generator, progress: bool = False):
    """Metropolis–Hastings chains over continuations; see the module docstring."""
    o = options
    config = MHConfig(max_new_tokens=max_new_tokens, move=o.move, mixture_weight=o.mixture_weight)
    prior = post.prior
    prompt_ids = prior.encode_prompts(prompts)
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    P, M = len(prompt_ids), max_new_tokens
    init_tokens = init_lengths = None
    if o.init_texts is not None:
        init_tokens, init_lengths = _init_tokens(prior, o.init_texts, P, n, M)
    prompt_rows = [prompt_ids[b // n] for b in range(P * n)]

    state = init(post, prompt_ids, n, max_new_tokens=M, generator=generator, init_tokens=init_tokens, init_lengths=init_lengths)
    history = [state] if o.return_chains else []

    def on_step(s, state):
        if o.return_chains:
            history.append(state._replace(decode=None))
        if o.callback is not None:
            P_, N_ = state.lengths.shape
            o.callback(StepReport(s, 0, state.texts, torch.full((P_, N_), -math.log(N_)), torch.full((P_,), float(N_))))

    chains = run_chains(
        state, lambda st, s: step(post, prompt_rows, st, config=config, generator=generator), o,
        rewards=lambda st: st.rewards, initial_rewards=state.rewards,
        keep=(lambda st: st._replace(decode=None)) if o.samples == "all" else None,
        on_step=on_step, progress=progress, desc="mh",
    )  # fmt: skip
    state, infos = chains.state, chains.infos

    # --- diagnostics -------------------------------------------------------------------------------
    acc = torch.stack([i.accepted for i in infos]).double()  # (S, P, N)
    cuts = torch.stack([i.cut for i in infos])  # (S, P, N)
    indep = torch.stack([i.independence for i in infos])  # (S, P, N)
    info = {
        "move": o.move,
        "samples": o.samples,
        "acceptance_rate": acc.mean((0, 2)),  # (P,)
        "acceptance_rate_per_chain": acc.mean(0),  # (P, N)
        **chains.info_fields(o),
    }
    if o.move != "independence":
        nbins = min(8, M)
        bin_of = cuts * nbins // M  # (S, P, N)
        suffix_moves = ~indep
        hits = torch.zeros(P, nbins, dtype=torch.float64)
        counts = torch.zeros(P, nbins, dtype=torch.float64)
        for b in range(nbins):
            sel = (suffix_moves & (bin_of == b)).double()  # (S, P, N)
            hits[:, b] = (sel * acc).sum((0, 2))
            counts[:, b] = sel.sum((0, 2))
        info["acceptance_by_cut"] = _rate(hits, counts)  # (P, bins); NaN where no move had such a cut
        info["acceptance_by_cut_bins"] = [-(-b * M // nbins) for b in range(nbins)]  # first cut index of each bin
    if o.move == "mixture":
        info["mixture_weight"] = float(o.mixture_weight)
        info["acceptance_rate_independence"] = _rate((acc * indep).sum((0, 2)), indep.double().sum((0, 2)))
        info["acceptance_rate_suffix"] = _rate((acc * ~indep).sum((0, 2)), (~indep).double().sum((0, 2)))
    if o.return_chains:
        info["chains"] = MHChains(
            tokens=torch.stack([h.tokens for h in history]),
            lengths=torch.stack([h.lengths for h in history]),
            log_prior=torch.stack([h.log_prior for h in history]),
            rewards=torch.stack([h.rewards for h in history]),
            texts=[h.texts for h in history],
            accepted=acc.bool(),
            cut=cuts,
            kept=o.kept,
        )

    # --- samples -----------------------------------------------------------------------------------
    out = [state] if o.samples == "final" else chains.kept
    K = len(out)
    tokens = torch.stack([o_.tokens for o_ in out], 2).reshape(P, n * K, M)  # (P, N·K, M) chain-major
    lengths = torch.stack([o_.lengths for o_ in out], 2).reshape(P, n * K)
    log_prior = torch.stack([o_.log_prior for o_ in out], 2).reshape(P, n * K)
    rew = torch.stack([o_.rewards for o_ in out], 2).reshape(P, n * K)
    texts = [[o_.texts[p][i] for i in range(n) for o_ in out] for p in range(P)]
    # Uniform weights over the states inside the support; states with reward -inf (chains that
    # never reached it) get weight 0, and a prompt with none inside raises DegenerateWeightsError.
    inside = torch.where(torch.isfinite(rew) & torch.isfinite(log_prior), 0.0, -math.inf)
    stats = normalize_prompts(inside, prompts, what="mh final states")
    cont = Continuations(tokens, lengths, log_prior.float(), texts)
    return make_result(
        post, "mh", prompts, cont,
        log_prior=log_prior, rewards=rew, log_weights=stats.log_weights, log_Z=None, ess=stats.ess,
        targets_posterior=True, info=MHInfo.of(info),
    )  # fmt: skip


METHOD = register(Method("mh", MHOptions, MHInfo, run))
