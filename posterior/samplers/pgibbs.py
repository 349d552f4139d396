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
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from posterior.diagnostics.mcmc import finite_mean, reward_trace_diagnostics
from posterior.kernels import normalize_log_weights
from posterior.priors.base import Continuations
from posterior.samplers.callbacks import StepReport
from posterior.samplers.common import make_result, normalize_prompts, prompt_name
from posterior.samplers.engine import EngineConfig, Reference, run, widen
from posterior.samplers.options import check_burn_in, check_option
from posterior.samplers.registry import register_sampler
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
    state, _ = run(model_of(), rows, cfg, generator=generator, pad=pad, reference=reference, name_prompt=name_prompt,
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


@register_sampler("pgibbs")
def particle_gibbs(
    post,
    prompts,
    *,
    n: int,
    max_new_tokens: int,
    generator,
    progress: bool = False,
    particles: int = 16,  # particles per conditional SMC sweep (N >= 2 to move)
    steps: int = 16,  # sweeps per chain
    burn_in: int | None = None,  # sweeps discarded before the kept trace; None: steps // 2
    ess_threshold: float = 0.5,  # as SMC's: resample a chain's sweep when ESS < ess_threshold · particles
    twist="auto",  # as SMC's
    proposal: str = "bootstrap",  # as SMC's
    lookahead: int = 8,  # as SMC's
    block_size: int = 1,  # as SMC's
    decode_ahead: bool = True,  # as SMC's (sequence-level priors)
    check_twist: bool = True,  # as SMC's
    callback: Callable | None = None,  # fn(StepReport) after every sweep
):
    """n particle Gibbs chains per prompt; see the module docstring."""
    particles = check_option("pgibbs", "particles", particles)
    steps = check_option("pgibbs", "steps", steps)
    burn_in = check_burn_in(steps, check_option("pgibbs", "burn_in", burn_in))
    check_option("pgibbs", "callback", callback)
    prior = post.prior
    prompt_ids = prior.encode_prompts(prompts)
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    P = len(prompt_ids)
    rows = [ids for ids in prompt_ids for _ in range(n)]  # chain b continues prompt b // n
    cfg = EngineConfig(beta=post.beta, num_particles=particles, max_new_tokens=max_new_tokens,
                       ess_threshold=ess_threshold, resampling="multinomial")  # fmt: skip

    def model_of():
        return build_model(post, rows, n=particles, max_new_tokens=max_new_tokens, twist=twist, proposal=proposal,
                           lookahead=lookahead, block_size=block_size, decode_ahead=decode_ahead, check_twist=check_twist)  # fmt: skip

    twist_name = getattr(model_of().pot.twist, "name", "none")  # also validates the options before any sweep
    pad = prior.eos_token_ids[0]

    def name_prompt(b):
        return f"{prompt_name(prompts, b // n)} (chain {b % n})"

    reference = None
    trace, moved = [], []
    restarts = torch.zeros(P * n, dtype=torch.long)  # sweeps a chain ran without a reference after the first
    for s in tqdm(range(steps), desc="pgibbs", unit="sweep", disable=not progress, leave=False):
        tokens, lengths, reward, log_prior, free = sweep(model_of, rows, cfg, reference, generator=generator, pad=pad, name_prompt=name_prompt)
        if reference is not None:
            moved.append(free)
            restarts += (~reference.rows).long()
        # a chain whose state is outside the support (its first sweeps lost every particle) has no
        # reference: its next sweep is a fresh SMC sweep (length 0: particle 0 free, not kept)
        reference = Reference(tokens, torch.where(torch.isfinite(reward), lengths, 0))
        trace.append(reward.view(P, n))
        if callback is not None:
            cont_texts = prior.texts_of(tokens.view(P, n, -1), lengths.view(P, n))
            callback(StepReport(s + 1, int(lengths.max()), cont_texts, torch.full((P, n), -math.log(n)), torch.full((P,), float(n))))

    trace_t = torch.stack(trace, -1)  # (P, n, steps)
    r_hat, mcmc_ess = reward_trace_diagnostics(trace_t[..., burn_in:])
    moved_t = torch.stack(moved, -1).double().view(P, n, -1) if moved else torch.zeros(P, n, 0, dtype=torch.float64)
    T = tokens.shape[1]
    cont_tokens = tokens.view(P, n, T)
    cont_lengths = lengths.view(P, n)
    texts = prior.texts_of(cont_tokens, cont_lengths)
    rew = reward.view(P, n)
    inside = torch.where(torch.isfinite(rew), 0.0, -math.inf)  # a chain outside the support: weight 0
    stats = normalize_prompts(inside, prompts, what="pgibbs final states")
    info = {
        "particles": particles, "steps": steps, "burn_in": burn_in, "proposal": proposal, "block_size": block_size,
        "twist": twist_name,
        "r_hat": r_hat, "mcmc_ess": mcmc_ess, "reward_trace": finite_mean(trace_t, 1),
        "moved": moved_t.mean((1, 2)) if moved else torch.full((P,), math.nan, dtype=torch.float64),
        "restarts": restarts.view(P, n).sum(1), "outside_support": (~torch.isfinite(rew)).sum(1),
    }  # fmt: skip
    cont = Continuations(cont_tokens, cont_lengths, log_prior.view(P, n).float(), texts)
    return make_result(
        post, "pgibbs", prompts, cont, log_prior=log_prior.view(P, n), rewards=rew,
        log_weights=stats.log_weights, log_Z=None, ess=stats.ess, info=info,
    )  # fmt: skip


__all__ = ["particle_gibbs", "pick", "sweep"]
