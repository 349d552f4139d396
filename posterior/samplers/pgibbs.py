"""Particle Gibbs ("pgibbs"): Markov chains whose kernel is one conditional SMC sweep.

Andrieu, Doucet & Holenstein 2010 ("Particle Markov chain Monte Carlo methods"). A chain's state is
one whole continuation x. A sweep runs SMC with ``particles`` particles over the same targets as
``method="smc"`` (any twist, proposal and block size; step-wise or sequence-level prior), except
that particle 0 is the *reference*: it is forced along the current state x, weighted at every
step by exactly the formula of a free particle on its own prefix (never a full-trajectory weight
against partial ones, the bug class of its_hub#54), and kept as its own ancestor at every
resampling while the other N-1 ancestors are drawn multinomially from all N weights (the engine's
``reference`` hook, ``posterior.samplers.engine``). The next state is particle k drawn with
probability ∝ its final weight, reference included. This kernel leaves pi* invariant for any N >= 1
(ibid., Theorem 5), so after burn-in every chain's state is a draw from pi* — no weights, no bias
from a finite N; a larger N only mixes faster. N = 1 never moves (the reference is the only
particle), so the chain would return its first state, a draw of the first sweep, labelled a sample
of pi*: ``particles`` < 2 is refused (the option table's check, shared by the library, the command
line and the server).

The first sweep has no reference (plain SMC with multinomial resampling): its pick is a draw from
the SMC approximation, which burn-in forgets. Under a hard constraint a first sweep may lose every
particle of a chain: that chain has no state in the support yet, so its next sweep runs without a
reference again (a retry), until one gives it a state; the other chains run on untouched (any
starting state in the support is valid: burn-in forgets it). ``info["restarts"]`` counts these
retries per prompt and ``info["outside_support"]`` the chains still without a state in the
support at the end (weight 0 in the result). n chains per prompt run as one batch: the engine sees
P·n rows of ``particles`` particles. Like MH, the result holds each chain's final state with
uniform weights (log Z: None; pgibbs gives no unbiased estimate of Z), and ``info`` has the split
R-hat and MCMC ESS of the kept reward traces across chains (Gelman & Rubin 1992; Geyer 1992), the
reward trace, and ``moved``: the fraction of sweeps whose pick was a free particle (the reference
kept otherwise) — particle Gibbs' acceptance rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from posterior.kernels import normalize_log_weights
from posterior.priors.base import Continuations
from posterior.samplers.callbacks import StepReport
from posterior.samplers.common import make_result, normalize_prompts, prompt_name
from posterior.samplers.engine import EngineConfig, Reference, widen
from posterior.samplers.engine import run as run_engine
from posterior.samplers.chains import ChainsInfo, run_chains
from posterior.samplers.options import PGibbsOptions
from posterior.samplers.registry import Method, register
from posterior.samplers.smc import build_model


def pick(log_weights: torch.Tensor, *, generator) -> torch.Tensor:
    """(B,) index of one particle per row, drawn with probability ∝ exp(log_weights) (B, N)."""
    w = normalize_log_weights(log_weights).log_weights.double().exp()  # (B, N)
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.multinomial(w.to(dev), 1, generator=generator).squeeze(1).cpu()


def sweep(model_of, rows, cfg, reference: Reference | None, *, generator, pad, name_prompt):
    """One conditional SMC sweep over B = len(rows) chains (a chain whose reference row has length
    0 runs a plain SMC sweep); returns the picked trajectories (tokens (B, T), lengths (B,)), their
    rewards and log pi0 (B,), and which picks were free (B,). A chain whose particles all died
    (weight 0: only without a reference) picks particle 0 with reward -inf: no state in the support."""
    state, _ = run_engine(model_of(), rows, cfg, generator=generator, pad=pad, reference=reference, name_prompt=name_prompt,
                   on_degenerate="keep")  # fmt: skip
    p = state.particles
    B, N = p.lengths.shape
    dead = state.dead_at > 0  # (B,)
    k = torch.zeros(B, dtype=torch.long)
    if not bool(dead.all()):
        k[~dead] = pick(p.log_weights[~dead], generator=generator)  # (B,)
    b = torch.arange(B)
    lengths = p.lengths[b, k]
    T = max(1, int(lengths.max()))
    tokens = widen(p.tokens[b, k], T, pad)[:, :T]
    reward = torch.where(p.ended[b, k] & ~dead, p.psi[b, k], -math.inf)
    free = (k != 0) | (torch.ones(B, dtype=torch.bool) if reference is None else ~reference.rows)
    return tokens, lengths, reward, p.log_prior[b, k], free


@dataclass(frozen=True, eq=False)
class PGibbsInfo(ChainsInfo):
    """``res.info`` of ``method="pgibbs"`` (with the chains' fields: steps, burn_in, thin, r_hat, mcmc_ess, reward_trace)."""

    particles: int | None = None
    proposal: str | None = None
    block_size: int | None = None
    twist: str | None = None  # the twist's name ("none": no twist)
    moved: torch.Tensor | None = None  # (P,) fraction of sweeps whose pick was a free particle (the acceptance rate)
    restarts: torch.Tensor | None = None  # (P,) sweeps run afresh for chains with no state in the support yet
    outside_support: torch.Tensor | None = None  # (P,) chains still without a state in the support (weight 0)


def run(post, prompts, options: PGibbsOptions, *, n: int, max_new_tokens: int, generator, progress: bool = False):
    """n particle Gibbs chains per prompt; see the module docstring."""
    o = options
    prior = post.prior
    prompt_ids = prior.encode_prompts(prompts)
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    P = len(prompt_ids)
    rows = [ids for ids in prompt_ids for _ in range(n)]  # chain b continues prompt b // n
    cfg = EngineConfig(beta=post.beta, num_particles=o.particles, max_new_tokens=max_new_tokens,
                       ess_threshold=o.ess_threshold, resampling="multinomial")  # fmt: skip

    def model_of():
        return build_model(post, rows, cfg, twist=o.twist, proposal=o.proposal, lookahead=o.lookahead,
                           block_size=o.block_size, decode_ahead=o.decode_ahead, check_twist=o.check_twist)  # fmt: skip

    twist_name = getattr(model_of().pot.twist, "name", "none")  # also validates the options before any sweep
    pad = prior.eos_token_ids[0]

    def name_prompt(b):
        return f"{prompt_name(prompts, b // n)} (chain {b % n})"

    moved = []
    restarts = torch.zeros(P * n, dtype=torch.long)  # sweeps a chain ran without a reference after the first

    def one_sweep(state, s):
        reference = None if state is None else state.reference
        tokens, lengths, reward, log_prior, free = sweep(model_of, rows, cfg, reference, generator=generator, pad=pad, name_prompt=name_prompt)
        if reference is not None:
            moved.append(free)
            restarts.add_((~reference.rows).long())
        # a chain whose state is outside the support (its first sweeps lost every particle) has no
        # reference: its next sweep is a fresh SMC sweep (length 0: particle 0 free, not kept)
        return _Chains(tokens, lengths, reward, log_prior, Reference(tokens, torch.where(torch.isfinite(reward), lengths, 0))), None

    def on_step(s, state):
        if o.callback is not None:
            texts = prior.texts_of(state.tokens.view(P, n, -1), state.lengths.view(P, n))
            o.callback(StepReport(s, int(state.lengths.max()), texts, torch.full((P, n), -math.log(n)), torch.full((P,), float(n))))

    chains = run_chains(None, one_sweep, o, rewards=lambda st: st.reward.view(P, n), on_step=on_step, progress=progress,
                        desc="pgibbs")  # fmt: skip
    last = chains.state
    moved_t = torch.stack(moved, -1).double().view(P, n, -1) if moved else torch.zeros(P, n, 0, dtype=torch.float64)
    T = last.tokens.shape[1]
    cont_tokens = last.tokens.view(P, n, T)
    cont_lengths = last.lengths.view(P, n)
    texts = prior.texts_of(cont_tokens, cont_lengths)
    rew = last.reward.view(P, n)
    inside = torch.where(torch.isfinite(rew), 0.0, -math.inf)  # a chain outside the support: weight 0
    stats = normalize_prompts(inside, prompts, what="pgibbs final states")
    info = PGibbsInfo(
        particles=o.particles, proposal=o.proposal, block_size=o.block_size, twist=twist_name,
        **chains.info_fields(o),
        moved=moved_t.mean((1, 2)) if moved else torch.full((P,), math.nan, dtype=torch.float64),
        restarts=restarts.view(P, n).sum(1), outside_support=(~torch.isfinite(rew)).sum(1),
    )  # fmt: skip
    cont = Continuations(cont_tokens, cont_lengths, last.log_prior.view(P, n).float(), texts)
    return make_result(
        post, "pgibbs", prompts, cont, log_prior=last.log_prior.view(P, n), rewards=rew,
        log_weights=stats.log_weights, log_Z=None, ess=stats.ess, info=info,
    )  # fmt: skip


class _Chains(NamedTuple):
    """The chains' states after a sweep (B = P·n rows) and the reference of the next sweep."""

    tokens: torch.Tensor  # (B, T) int64
    lengths: torch.Tensor  # (B,)
    reward: torch.Tensor  # (B,) float64 (-inf: outside the support)
    log_prior: torch.Tensor  # (B,) float64
    reference: Reference


METHOD = register(Method("pgibbs", PGibbsOptions, PGibbsInfo, run))


__all__ = ["METHOD", "PGibbsInfo", "pick", "run", "sweep"]
