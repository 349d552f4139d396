"""The SMC engine: particles, weights, ancestry, resampling and log Ẑ as init + step over explicit
state, driven by one loop (particles' ``FeynmanKac`` / ``SMC``; blackjax ``smc/base.py``).

The model side (:class:`SMCModel`, ``posterior.samplers.smc_model``) supplies, per step, the
proposal and the potentials: it extends the m running particles by one token or a block and
returns a :class:`Move` with the new tokens, their log pi0 and log q, the potential g of each new
prefix and the incremental log-weight

    log w_t = log gamma_t(x_1:t) - log gamma_s(x_1:s) - log q(x_s+1:t | x_1:s),
    gamma_t(x_1:t) = pi0(x_1:t) exp(g_t(x_1:t) / beta),

with g = psi (the twist) on running prefixes and g = r (the reward) on ended ones. The engine
(this module) owns everything else: it writes the move into the particles, normalises the
weights per prompt (ESS, log-mean-exp), raises when a prompt has no particle left, resamples the
prompts whose ESS < ess_threshold·N at the steps the model calls boundaries, and keeps log Ẑ:

    log Ẑ = sum over resampling epochs of log (1/N) sum_i W_i,

unbiased for Z = sum_x pi0(x) exp(r(x)/beta) (Del Moral 2004, ch. 7; Naesseth, Lindsten & Schön
2019). Weights are stored unnormalised so that log-mean-exp(log_w) is always the running estimate;
resampled prompts get uniform weights at their log-mean-exp. After the last step, :func:`finish`
reweights every ended particle by exp((r(x) - g(x)) / beta), the last target being exactly
pi0 · exp(r/beta) (zero for a model that already used r where particles ended; the untwisted
model defers the finite reward to here, calling the reward once per ended particle).

Who owns what after each call: :func:`init` and :func:`step` return a new :class:`SMCState`;
the input state's ``carry`` (the model's decode state / KV cache) is consumed by ``step`` and
must not be used again; the particle tensors are never mutated in place (each step builds new
ones), so infos and states a caller keeps stay valid.

Hooks for variants (each is a keyword of :func:`step` / :func:`run`):

* ``reference`` (:class:`Reference`, conditional SMC / particle Gibbs): particle 0 of each prompt
  follows the given trajectory. The engine forces its tokens through the model (``forced``
  below), so it is weighted at every step exactly as a free particle (the same formula on its
  own prefix, never a full-trajectory weight against partial ones, its_hub#54), and at every
  resampling it is kept as ancestor 0 while the N-1 others are drawn from all N weights
  (multinomially, as in Andrieu, Doucet & Holenstein 2010).
* ``forced`` tokens: the model's ``propose`` takes a :class:`Forced` (which rows, which tokens)
  and must weight a forced row with the same formula as a free one (q evaluated at the forced
  tokens); the reference uses it, and so can teacher-forced training.
* the proposal's own log q: every :class:`Move` carries ``log_q`` of the tokens it drew, the
  engine accumulates it in ``Particles.log_q`` and reports each step's in
  ``StepInfo.log_q_increment`` (twist-training objectives read it).
* ``callback(state, info)`` after every step (UIs; training collecting per-step quantities).

Adding an SMC variant: one file that builds a model side (or reuses ``smc_model``'s) and calls
:func:`run` with the hooks it needs; it never re-implements weights or resampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from posterior import streams
from posterior.errors import DegenerateWeightsError
from posterior.kernels import normalize_log_weights, resample
from posterior.samplers.options import Options, ess_threshold_field, integer, resampling_field
from posterior.validate import check_real


# --------------------------------------------------------------------------------------------------
# State and infos
# --------------------------------------------------------------------------------------------------
class Particles(NamedTuple):
    """P prompts × N particles. Tensors are CPU and never mutated in place."""

    tokens: torch.Tensor  # (P, N, W) int64, EOS-padded; W >= t grows with the run
    lengths: torch.Tensor  # (P, N) int64
    log_prior: torch.Tensor  # (P, N) float64 log pi0(x_1:t)
    log_q: torch.Tensor  # (P, N) float64 log q of the tokens as proposed (forced tokens included)
    log_weights: torch.Tensor  # (P, N) float64 unnormalised; log-mean-exp = running log Ẑ
    psi: torch.Tensor  # (P, N) float64 potential g of the current prefix (r(x) once ended, unless deferred)
    ended: torch.Tensor  # (P, N) bool: reached EOS or max_new_tokens
    reward: torch.Tensor  # (P, N) float64 r(x) once ended and scored (NaN before)


@dataclass(frozen=True)
class SMCState:
    """Particles after ``t`` tokens (every running particle has exactly t), and the model's carry
    (decode states, tokens drawn ahead: the model's to read and the next step's to consume)."""

    t: int
    particles: Particles
    carry: Any
    dead_at: torch.Tensor | None = None  # (P,) int64 step at which every particle of a prompt had died (0: alive); ``on_degenerate="keep"``

    @property
    def running(self) -> torch.Tensor:
        """(P, N) bool: not ended and alive (finite weight) — the particles the next step extends."""
        return ~self.particles.ended & ~torch.isneginf(self.particles.log_weights)


class StepInfo(NamedTuple):
    ess: torch.Tensor  # (P,) ESS after reweighting, before resampling
    resampled: torch.Tensor  # (P,) bool
    ancestors: torch.Tensor  # (P, N) int64 (identity where not resampled)
    log_Z_increment: torch.Tensor  # (P,) float64 change of the running log Ẑ
    log_q_increment: torch.Tensor  # (P, N) float64 log q of this step's tokens (0 where not extended), before resampling
    tokens: int  # tokens per running particle after the step (state.t)


def _positive_real(name, value) -> float:
    return check_real(name, value, positive=True)


@dataclass(frozen=True)
class EngineConfig(Options):
    """The engine's own config, checked once on construction (each field's check, as every
    method's options): the problem's size — beta, N and the horizon, held here only (the model
    side's :class:`~posterior.samplers.smc_model.Potentials` reads them from this config) — and
    the resampling rule."""

    beta: float = field(metadata={"check": _positive_real, "help": "temperature of pi* (> 0)"})
    num_particles: int = field(metadata={"check": integer(1), "help": "N, particles per prompt"})
    max_new_tokens: int = field(metadata={"check": integer(1), "help": "the horizon T, tokens per particle (EOS counted)"})
    ess_threshold: float = ess_threshold_field("N")
    resampling: str = resampling_field()

    def same_problem(self, other: EngineConfig) -> bool:
        """Same beta, N and horizon (the resampling rule may differ)."""
        return (self.beta, self.num_particles, self.max_new_tokens) == (other.beta, other.num_particles, other.max_new_tokens)


# --------------------------------------------------------------------------------------------------
# The model side's interface
# --------------------------------------------------------------------------------------------------
class Forced(NamedTuple):
    """Tokens some running rows must take this step (conditional SMC's reference, teacher forcing)."""

    rows: torch.Tensor  # (m,) bool: which of the m running particles are forced
    tokens: torch.Tensor  # (m, K) int64 their next tokens (EOS-padded; rows not forced: ignored)
    lengths: torch.Tensor  # (m,) int64 how many of them (< K only where the trajectory ends: it then ends with EOS or at max_new_tokens)


class Move(NamedTuple):
    """The model side's answer for one step, over the m running particles (flat ids ``rows``)."""

    tokens: torch.Tensor  # (m, K) int64 new tokens, EOS-padded after ``lengths``
    lengths: torch.Tensor  # (m,) int64 new tokens of each row (>= 1)
    log_prior: torch.Tensor  # (m,) float64 log pi0 of the new tokens
    log_q: torch.Tensor  # (m,) float64 log q of the new tokens under the proposal that drew them
    potential: torch.Tensor  # (m,) float64 g of the new prefix: psi_t, or r(x) where it ended (deferred: 0 / -inf)
    log_increment: torch.Tensor  # (m,) float64 incremental log-weight
    ended: torch.Tensor  # (m,) bool
    reward: torch.Tensor  # (m,) float64 r(x) where ended and scored, NaN elsewhere
    boundary: bool  # resampling may happen after this step
    carry: Any  # the model's carry after the move, before resampling


class SMCModel:
    """The model side (see ``posterior.samplers.smc_model`` for the ones SMC uses).

    ``init`` returns the carry for N particles of each prompt; ``step_tokens(t)`` is how many
    tokens the next step adds (1, or a block); ``propose`` extends the running rows and weights them
    (``state.carry`` is consumed); ``advance`` takes the move's carry after the engine has
    resampled: ``src`` (P·N,) is the flat ancestor of every particle (identity where nothing was
    resampled) and ``running`` (P, N) says which particles the next step extends. A model whose
    final potentials are already r returns ``defers_reward = False``.
    """

    def init(self, prompt_ids: list[list[int]], num_particles: int) -> Any:
        raise NotImplementedError

    def step_tokens(self, t: int) -> int:
        raise NotImplementedError

    def propose(self, state: SMCState, rows: torch.Tensor, *, forced: Forced | None, generator) -> Move:
        raise NotImplementedError

    def advance(self, carry: Any, particles: Particles, src: torch.Tensor, running: torch.Tensor, resampled: torch.Tensor) -> Any:
        raise NotImplementedError

    @property
    def config(self) -> EngineConfig | None:
        """The engine config the model was built for (its beta, N and horizon), or None."""
        return None

    def close(self, carry: Any) -> None:
        """Release what the carry holds outside this process (requests running in a serving
        engine); :func:`run` calls it once the run is over, also when it fails. Default: nothing."""


@dataclass(frozen=True)
class Reference:
    """Conditional SMC: particle 0 of prompt p follows ``tokens[p, :lengths[p]]`` (EOS-padded).
    A row of length 0 has no reference: its particle 0 is free and not kept at resampling (plain
    SMC on that row; particle Gibbs uses it for a chain that has no state in the support yet)."""

    tokens: torch.Tensor  # (P, T) int64
    lengths: torch.Tensor  # (P,) int64

    @property
    def rows(self) -> torch.Tensor:
        """(P,) bool: the rows that have a reference trajectory."""
        return self.lengths > 0

    def forced(self, state: SMCState, rows: torch.Tensor, k: int, pad: int) -> Forced:
        """Forced tokens of the next ``k`` tokens for the running rows that are particle 0."""
        P, N = state.particles.lengths.shape
        is_ref = rows % N == 0  # (m,)
        t = state.t
        toks = torch.full((rows.numel(), k), pad, dtype=torch.long)
        lens = torch.zeros(rows.numel(), dtype=torch.long)
        for j in is_ref.nonzero().squeeze(1).tolist():
            p = int(rows[j]) // N
            L = int(self.lengths[p])
            n = max(0, min(k, L - t))
            toks[j, :n] = self.tokens[p, t : t + n]
            lens[j] = n
        return Forced(is_ref & (lens > 0), toks, lens)


# --------------------------------------------------------------------------------------------------
# Pure numerics
# --------------------------------------------------------------------------------------------------
def resample_decision(ess: torch.Tensor, live: torch.Tensor, num_particles: int, threshold: float) -> torch.Tensor:
    """(P,) bool: resample the prompts that still have running particles and ESS < threshold·N
    (threshold >= 1: always, 0: never)."""
    low = torch.full_like(live, threshold >= 1.0) | (ess < threshold * num_particles)
    return live & low


def resample_weights(
    log_weights: torch.Tensor,  # (P, N) unnormalised
    decide: torch.Tensor,  # (P,) bool
    scheme: str,
    *,
    generator: torch.Generator | None,
    keep_first: bool | torch.Tensor = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestors (P, N) (identity on rows not resampled) and the new log-weights (P, N):
    resampled rows become uniform at their log-mean-exp, so log-mean-exp is unchanged.

    ``keep_first`` (conditional SMC; a bool, or (P,) bool per row): particle 0 keeps ancestor 0 and
    the other N-1 ancestors are drawn from all N weights."""
    P, N = log_weights.shape
    ancestors = torch.arange(N).expand(P, N).clone()  # (P, N)
    if not bool(decide.any()):
        return ancestors, log_weights
    dev = generator.device if generator is not None else torch.device("cpu")
    keep = torch.as_tensor(keep_first, dtype=torch.bool).expand(P)  # (P,)
    rows = (decide & keep).nonzero().squeeze(1)
    if rows.numel():
        if N > 1:
            ancestors[rows, 1:] = resample(log_weights[rows].to(dev), N - 1, scheme, generator=streams.take(generator, rows)).cpu()
        ancestors[rows, 0] = 0
    rows = (decide & ~keep).nonzero().squeeze(1)
    if rows.numel():
        ancestors[rows] = resample(log_weights[rows].to(dev), N, scheme, generator=streams.take(generator, rows)).cpu()
    log_mean = torch.logsumexp(log_weights, -1) - math.log(N)  # (P,)
    return ancestors, torch.where(decide[:, None], log_mean[:, None], log_weights)


def take(x: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """Gather (P, N, ...) particles by (P, N) ancestor indices."""
    idx = ancestors.view(*ancestors.shape, *([1] * (x.dim() - 2))).expand(*ancestors.shape, *x.shape[2:])
    return x.gather(1, idx)


def widen(tokens: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """(B, W) token storage at least ``width`` wide (doubling, so growth costs O(total) copies)."""
    if tokens.shape[1] >= width:
        return tokens.clone()
    extra = max(width, 2 * tokens.shape[1]) - tokens.shape[1]
    return torch.cat([tokens, torch.full((tokens.shape[0], extra), pad, dtype=tokens.dtype)], 1)


# --------------------------------------------------------------------------------------------------
# init / step / finish / run
# --------------------------------------------------------------------------------------------------
def init(model: SMCModel, prompt_ids: list[list[int]], cfg: EngineConfig, *, pad: int) -> SMCState:
    """N particles per prompt with weight 1 and psi_0 = 0, and the model's carry. Token storage
    grows with the steps run (no (P, N, max_new_tokens) allocation up front)."""
    P, N = len(prompt_ids), cfg.num_particles
    zeros = torch.zeros(P, N, dtype=torch.float64)
    particles = Particles(
        tokens=torch.full((P, N, 0), pad, dtype=torch.long),
        lengths=torch.zeros(P, N, dtype=torch.long),
        log_prior=zeros,
        log_q=zeros,
        log_weights=zeros,
        psi=zeros,
        ended=torch.zeros(P, N, dtype=torch.bool),
        reward=torch.full((P, N), math.nan, dtype=torch.float64),
    )
    return SMCState(0, particles, model.init(prompt_ids, N))


def step(
    model: SMCModel,
    state: SMCState,
    cfg: EngineConfig,
    *,
    generator: torch.Generator | None,
    pad: int,
    reference: Reference | None = None,
    name_prompt: Callable[[int], str] = lambda p: f"#{p}",
    on_degenerate: str = "raise",
) -> tuple[SMCState, StepInfo]:
    """Extend every running particle (the model's move), reweight, resample where the ESS is low.

    ``state.carry`` is consumed. When every particle of a prompt has weight 0 after this step:
    ``on_degenerate="raise"`` raises DegenerateWeightsError (naming the step and the prompts,
    through ``name_prompt``); ``"keep"`` keeps the prompt with every weight 0 — its particles stop,
    its log Ẑ is -inf (Ẑ = 0: a legitimate draw of the unbiased estimator) and ``state.dead_at``
    records the step — while the other prompts run on.
    """
    if on_degenerate not in ("raise", "keep"):
        raise ValueError(f'on_degenerate must be "raise" or "keep", got {on_degenerate!r}')
    old = state.particles
    P, N = old.lengths.shape
    t, T = state.t, cfg.max_new_tokens

    def flat(x):  # (P, N, ...) -> (P·N, ...)
        return x.reshape(P * N, *x.shape[2:])

    rows = flat(state.running).nonzero().squeeze(1)  # (m,) flat ids of the running particles
    k = model.step_tokens(t)
    forced = None if reference is None else reference.forced(state, rows, k, pad)
    if forced is not None and not bool(forced.rows.any()):
        forced = None
    move = model.propose(state, rows, forced=forced, generator=streams.for_rows(generator, rows // N))  # per-prompt streams: one child per running particle

    K = move.tokens.shape[1]
    tokens = widen(flat(old.tokens), t + K, pad)
    tokens[rows, t : t + K] = move.tokens
    lengths = flat(old.lengths).clone()
    lengths[rows] = t + move.lengths
    log_q_inc = torch.zeros(P * N, dtype=torch.float64).index_copy(0, rows, move.log_q)
    new = Particles(
        tokens.view(P, N, -1),
        lengths.view(P, N),
        flat(old.log_prior).index_add(0, rows, move.log_prior).view(P, N),
        flat(old.log_q).index_add(0, rows, move.log_q).view(P, N),
        flat(old.log_weights).index_add(0, rows, move.log_increment).view(P, N),
        flat(old.psi).index_copy(0, rows, move.potential).view(P, N),
        flat(old.ended).index_copy(0, rows, move.ended).view(P, N),
        flat(old.reward).index_copy(0, rows, move.reward).view(P, N),
    )
    t_new = t + k
    before = normalize_log_weights(old.log_weights).log_mean  # (P,)
    stats = normalize_log_weights(new.log_weights)
    dead_at = torch.zeros(P, dtype=torch.long) if state.dead_at is None else state.dead_at
    newly = stats.degenerate & (dead_at == 0)  # (P,) prompts whose last particles died at this step
    if on_degenerate == "keep":
        dead_at = torch.where(newly, t_new, dead_at)
    elif bool(stats.degenerate.any()):
        bad = stats.degenerate.nonzero().squeeze(1).tolist()
        where = f"step {t + 1} (token {t + 1} of max_new_tokens={T})" if k == 1 else f"block ending at token {t_new} of max_new_tokens={T}"
        raise DegenerateWeightsError(
            f"SMC {where}: every one of the {N} particles of prompt(s) "
            f"{', '.join(name_prompt(p) for p in bad)} has weight 0 (log-weight -inf: the "
            "reward or the twist is -inf on all of them); use more particles, the tilted proposal, or relax the constraint",
            rows=bad,
        )
    still = ~new.ended & ~torch.isneginf(new.log_weights)  # (P, N) running after this step
    if move.boundary:
        decide = resample_decision(stats.ess, still.any(-1), N, cfg.ess_threshold)
    else:
        decide = torch.zeros(P, dtype=torch.bool)
    ancestors, log_weights = resample_weights(
        new.log_weights, decide, cfg.resampling, generator=generator, keep_first=False if reference is None else reference.rows
    )
    new = new._replace(log_weights=log_weights)
    if bool(decide.any()):
        new = Particles(*(x if name == "log_weights" else take(x, ancestors) for name, x in zip(Particles._fields, new)))
        still = take(still, ancestors)
    src = (ancestors + torch.arange(P)[:, None] * N).reshape(-1)  # (P·N,) flat ancestor of each particle
    carry = model.advance(move.carry, new, src, still, decide)
    # a prompt dead before this step has log-mean -inf before and after: its increment is 0, not NaN
    increment = torch.where(torch.isneginf(before), torch.where(torch.isneginf(stats.log_mean), 0.0, stats.log_mean), stats.log_mean - before)
    increment = torch.where(newly, -math.inf, increment)
    info = StepInfo(stats.ess, decide, ancestors, increment, log_q_inc.view(P, N), t_new)
    return SMCState(t_new, new, carry, None if on_degenerate == "raise" else dead_at), info


def finish(state: SMCState, infos: list[StepInfo], cfg: EngineConfig) -> tuple[SMCState, list[StepInfo]]:
    """The last target pi0 · exp(r/beta): reweight every ended particle with finite weight by
    exp((r(x) - g(x)) / beta) (zero where the model already used r). Its log Ẑ increment is added
    to the last step's, so the increments still sum to log Ẑ. Particles never scored keep their
    weight (r is NaN only where a particle ended with weight 0 or never ended)."""
    p = state.particles
    alive = p.ended & ~torch.isneginf(p.log_weights)  # (P, N)
    scored = alive & ~torch.isnan(p.reward)
    if not bool((scored & (p.reward != p.psi)).any()):
        return state, infos
    r = torch.where(scored, p.reward, p.psi)
    before = normalize_log_weights(p.log_weights).log_mean
    log_weights = torch.where(alive, p.log_weights + (r - p.psi) / cfg.beta, -math.inf)
    after = normalize_log_weights(log_weights).log_mean
    change = torch.where(torch.isneginf(before) & torch.isneginf(after), 0.0, after - before)  # a dead prompt: 0, not NaN
    if infos:
        last = infos[-1]
        infos = infos[:-1] + [last._replace(log_Z_increment=last.log_Z_increment + change)]
    particles = p._replace(log_weights=log_weights, psi=torch.where(alive, r, p.psi))
    return SMCState(state.t, particles, state.carry, state.dead_at), infos


def run(
    model: SMCModel,
    prompt_ids: list[list[int]],
    cfg: EngineConfig,
    *,
    generator: torch.Generator | None,
    pad: int,
    reference: Reference | None = None,
    callback: Callable[[SMCState, StepInfo], None] | None = None,
    name_prompt: Callable[[int], str] = lambda p: f"#{p}",
    on_degenerate: str = "raise",
) -> tuple[SMCState, list[StepInfo]]:
    """The one driver: ``init``, ``step`` until every particle has ended (or max_new_tokens), ``finish``.

    Returns the final state (weights unnormalised, log-mean-exp = log Ẑ) and the per-step infos.
    ``on_degenerate`` as in :func:`step` ("keep": a prompt whose particles all die ends with every
    weight 0 and log Ẑ = -inf, ``state.dead_at`` > 0, and the others run on).
    """
    if model.config is not None and not model.config.same_problem(cfg):
        raise ValueError(
            f"the model side was built for beta={model.config.beta}, N={model.config.num_particles}, "
            f"max_new_tokens={model.config.max_new_tokens}, the engine runs {cfg.beta}, {cfg.num_particles}, {cfg.max_new_tokens}"
        )
    if reference is not None and cfg.resampling != "multinomial":
        raise ValueError(
            f"conditional SMC (a reference particle) resamples the N-1 free particles multinomially; "
            f"resampling={cfg.resampling!r} has no conditional version here: use resampling='multinomial'"
        )
    state = init(model, prompt_ids, cfg, pad=pad)
    if on_degenerate == "keep":
        state = SMCState(state.t, state.particles, state.carry, torch.zeros(len(prompt_ids), dtype=torch.long))
    infos: list[StepInfo] = []
    try:
        while state.t < cfg.max_new_tokens and bool(state.running.any()):
            state, info = step(model, state, cfg, generator=generator, pad=pad, reference=reference, name_prompt=name_prompt,
                               on_degenerate=on_degenerate)  # fmt: skip
            infos.append(info)
            if callback is not None:
                callback(state, info)
    finally:
        model.close(state.carry)  # a failed step leaves the previous carry, which holds the same resources
    return finish(state, infos, cfg)


def stack_infos(infos: Sequence[StepInfo], P: int, N: int) -> dict[str, torch.Tensor]:
    """Per-step infos as (..., steps) tensors (the sampler's ``res.info`` entries)."""

    def stack(xs, shape):
        return torch.stack(xs, -1) if xs else torch.zeros(shape)

    return {
        "ess_per_step": stack([i.ess.float() for i in infos], (P, 0)),
        "resampled": stack([i.resampled for i in infos], (P, 0)).bool(),
        "log_Z_increments": stack([i.log_Z_increment for i in infos], (P, 0)).double(),
        "num_resampling": torch.stack([i.resampled for i in infos], -1).sum(-1) if infos else torch.zeros(P, dtype=torch.long),
        "ancestry": stack([i.ancestors for i in infos], (P, N, 0)).long(),
    }


__all__ = [
    "EngineConfig", "Forced", "Move", "Particles", "Reference", "SMCModel", "SMCState", "StepInfo",
    "finish", "init", "resample_decision", "resample_weights", "run", "stack_infos", "step",
]  # fmt: skip
