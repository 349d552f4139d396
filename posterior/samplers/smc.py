"""Sequential Monte Carlo over tokens with twisted intermediate targets ("smc").

Targets. For a prompt, particles x_1:t grow one token per step under a proposal. The intermediate
targets are the prior tilted by a *twist* psi_t of the partial text (Naesseth, Lindsten & Schön
2019; Zhao et al. 2024, "Probabilistic inference in language models via twisted SMC"):

    gamma_t(x_1:t) = pi0(x_1:t) · exp(psi_t(x_1:t) / beta),     psi_0 = 0,

and once a particle has ended (EOS, or max_new_tokens tokens) its potential is the TRUE reward:
gamma(x) = pi0(x) · exp(r(x)/beta), so the last target is exactly the unnormalised pi*. Without a
twist (psi = 0) the finite part of the reward is deferred: an ended particle's potential is 0 while
others still run (-inf at once if r(x) = -inf, so dead ends still die and are resampled away), and
every ended particle is reweighted by exp(r(x)/beta) after the last step. Both are valid sequences
of targets (the last one is pi* either way, log Ẑ unbiased); deferring keeps particles that end
early from crowding out running ones at resampling, and makes a constant reward exact (every
weight equal, log Ẑ = c/beta, KL(pi*||pi0) = 0). The twist
is the reward on the partial text when ``reward.accepts_prefixes`` (``twist="auto"``), else 0
(bootstrap particle filter, Gordon et al. 1993), or any user function of partial texts. A twist
may be -inf only on prefixes none of whose completions has a finite reward (a prefix check for a
hard constraint); such particles die at once (weight 0) and are resampled away.

Blocks. With ``block_size=B`` weights change and resampling is checked every B tokens (and a
particle that ends inside a block gets its true reward there). On a *sequence-level* prior (a
serving engine: no next-token distributions) each block is one ``prior.continue_prefixes`` call
that extends every running particle by up to B tokens from pi0 (the bootstrap proposal), so the
block's incremental log-weight is (g(x_1:t+B) - psi_t(x_1:t)) / beta: the final target is still
exactly pi* and log Ẑ still unbiased (a bootstrap filter on the coarser time grid t = 0, B, 2B, ...).
On a *step-wise* prior particles are extended one token per step from the KV cache and the twist
is re-evaluated every B tokens (carried in between): the same targets, without re-encoding prefixes.

Incremental weights. With g(x_1:t) the potential of the new prefix (psi_t, or r if it ended) and
Delta = g(x_1:t) - psi_{t-1}(x_1:t-1), a proposal q(x_t | x_1:t-1) gets

    w_t = gamma_t(x_1:t) / (gamma_{t-1}(x_1:t-1) q(x_t | x_1:t-1)) = pi0(x_t | .) exp(Delta/beta) / q(x_t | .).

* ``proposal="bootstrap"``: q = pi0, so log w_t = Delta / beta.
* ``proposal="tilted"`` (step-wise priors): for each particle let C be the ``lookahead`` most
  likely next tokens under pi0 and
  phi(v) = Delta(v) for v in C (one batched reward/twist call on the k decoded texts), phi(v) = 0
  for v outside C (their Delta is *not* computed up front; taking 0 keeps q > 0 wherever pi0 > 0).
  Propose from q(v) = pi0(v) exp(phi(v)/beta) / L, L = sum_v pi0(v) exp(phi(v)/beta). Then

      w_t(v) = pi0(v) exp(Delta(v)/beta) / q(v) = L · exp((Delta(v) - phi(v)) / beta),

  i.e. log w_t = log L when v is in C (where phi = Delta) and log L + Delta(v)/beta when v is not,
  for which the twist (or reward) of the sampled non-candidate is evaluated after sampling.
  E_q[w_t] = sum_v pi0(v) exp(Delta(v)/beta) exactly, as the bootstrap increment's mean. With
  lookahead >= V this is the locally optimal proposal; with the optimal twist
  psi_t = beta log E_pi0[exp(r/beta) | x_1:t] every weight is then Z (zero variance).
  (Lew et al. 2023, "Sequential Monte Carlo steering of large language models using probabilistic
  programs", propose with such one-step look-ahead potentials.)

Resampling. Per prompt, when ESS < ess_threshold·N (1 = every step, 0 = never), draw ancestors
with a registered scheme (``posterior.samplers.resampling``), reorder the KV cache rows with one
``prior.reorder`` (a select that may reuse the cache in place), and set that prompt's weights to
their log-mean-exp. Weights are stored so that log-mean-exp(log_w) is always the running
estimate; at the end it is the standard estimator

    log Ẑ = sum over resampling epochs e of log (1/N) sum_i W_i^(e),

unbiased for Z = sum_x pi0(x) exp(r(x)/beta) (Del Moral 2004, "Feynman-Kac Formulae", ch. 7;
Naesseth, Lindsten & Schön 2019, "Elements of sequential Monte Carlo"). Ended particles leave the
decode batch (once they are half of it, or at the next resampling) but keep their weight and stay
resampleable (their target is the absorbing gamma(x) above); a copy of an ended particle is ended.

Hard constraints. ``Contains`` is 0/-inf and has no prefix semantics: its auto twist is 0, a
particle dies when it ends without the substring, and with ``proposal="tilted"`` an ending token
(EOS, or any token at the last step) is proposed with its true reward, so tokens that would end a
sequence without the substring are never proposed. To steer towards such a constraint, pass a
finite twist that favours prefixes satisfying it, e.g. ``twist=lambda ts: [0.0 if "great" in t else
-3.0 for t in ts]``: any finite twist leaves the final target exactly pi*. A prompt whose particles
all die raises :class:`~posterior.errors.DegenerateWeightsError` naming the step and the prompt.

Per-step numerics go through ``posterior.kernels``: ``normalize_log_weights`` gives ESS and
log-mean-exp, ``resample`` draws ancestors, and ``tilted_sample`` draws every token (q = pi0 for the
bootstrap): the Triton kernel on CUDA (its log L carries float32 rounding, ~1e-7 relative), the
float64 CDF inversion ``tilted_sample_cpu`` on the CPU. Weights are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from posterior.errors import DegenerateWeightsError
from posterior.kernels import TiltedSample, normalize_log_weights, resample, tilted_sample
from posterior.priors.base import Continuations, DecodeState, Prior, StepwisePrior
from posterior.rewards.base import Callable as CallableReward
from posterior.rewards.base import Reward
from posterior.samplers.callbacks import StepReport
from posterior.samplers.common import make_result, normalize_prompts, prompt_name
from posterior.samplers.registry import register_sampler
from posterior.kernels.schemes import RESAMPLERS


# --------------------------------------------------------------------------------------------------
# Pure numerics
# --------------------------------------------------------------------------------------------------
def draw_tokens(logprobs, *, potential=None, candidates=None, beta=1.0, generator=None) -> TiltedSample:
    """One token per row from q ∝ pi0 exp(phi/beta) through ``posterior.kernels.tilted_sample``
    (Triton on CUDA, the float64 CDF inversion on the CPU)."""
    return tilted_sample(logprobs, potential=potential, candidates=candidates, beta=beta, generator=generator)


def tilted_log_weight(log_norm: torch.Tensor, delta: torch.Tensor, phi: torch.Tensor, beta: float) -> torch.Tensor:
    """log w = log pi0(v) + Delta(v)/beta - log q(v) = log L + (Delta(v) - phi(v)) / beta.

    Parameters
    ----------
    log_norm : Tensor (B,)
        log L, the normaliser of q (-inf: the row has no proposal mass, the particle dies).
    delta : Tensor (B,)
        Delta(v) = g(x_1:t) - psi_{t-1} of the sampled token, computed exactly (-inf allowed).
    phi : Tensor (B,)
        The potential q used for v: Delta(v) if v was a candidate, else 0 (finite, as q(v) > 0).
    """
    return torch.where(torch.isneginf(log_norm), -math.inf, log_norm + (delta - phi) / beta)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestors (P, N) (identity on rows not resampled) and the new log-weights (P, N):
    resampled rows become uniform at their log-mean-exp, so log-mean-exp is unchanged."""
    P, N = log_weights.shape
    ancestors = torch.arange(N).expand(P, N).clone()  # (P, N)
    if not bool(decide.any()):
        return ancestors, log_weights
    rows = decide.nonzero().squeeze(1)
    dev = generator.device if generator is not None else torch.device("cpu")
    ancestors[rows] = resample(log_weights[rows].to(dev), N, scheme, generator=generator).cpu()
    log_mean = torch.logsumexp(log_weights, -1) - math.log(N)  # (P,)
    return ancestors, torch.where(decide[:, None], log_mean[:, None], log_weights)


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SMCConfig:
    """Options of one SMC run (validated here; errors name the value)."""

    beta: float
    num_particles: int
    max_new_tokens: int
    proposal: str = "bootstrap"  # "bootstrap" (q = pi0) | "tilted" (look-ahead over the top tokens)
    lookahead: int = 8  # candidates scored per particle and step by the tilted proposal
    block_size: int = 1  # tokens between twist evaluations / resampling checks
    ess_threshold: float = 0.5  # resample a prompt when ESS < ess_threshold · N
    resampling: str = "systematic"  # a name in posterior.samplers.resampling.RESAMPLERS

    def __post_init__(self):
        if self.proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {sorted(PROPOSALS)}, got {self.proposal!r}")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise ValueError(f"lookahead must be a positive int, got {self.lookahead!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        thr = self.ess_threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not (0.0 <= thr <= 1.0):
            raise ValueError(f"ess_threshold must be a number in [0, 1], got {thr!r}")
        if self.resampling not in RESAMPLERS:
            raise ValueError(f"unknown resampling scheme {self.resampling!r}; choose one of {sorted(RESAMPLERS)}")


@dataclass(frozen=True)
class Targets:
    """The potentials: the prior, the true reward r (ended particles) and the twist psi (partial
    texts; None = 0). ``twist is reward`` lets both be scored in one batched call."""

    prior: Prior
    reward: Reward
    twist: Reward | None

    @property
    def defers_reward(self) -> bool:
        """With no twist, an ended particle's finite reward is applied at the end of the run (see
        the module docstring), so particles that end early are not favoured by resampling."""
        return self.twist is None

    def potentials(self, texts: list[str], ended: list[bool]) -> torch.Tensor:
        """g of each (partial) text: psi(text) where running (0 without a twist) and, where ended,
        r(text) — or, when the reward is deferred, 0 where r is finite and -inf where it is not.
        (len(texts),) float64, one call per function."""
        out = torch.zeros(len(texts), dtype=torch.float64)
        if self.twist is self.reward or self.twist is None:
            idx = [i for i, e in enumerate(ended) if e or self.twist is not None]
            if idx:
                r = self.reward([texts[i] for i in idx])
                out[idx] = torch.zeros_like(r).masked_fill(torch.isneginf(r), -math.inf) if self.defers_reward else r
            return out
        for fn, want in ((self.reward, True), (self.twist, False)):
            idx = [i for i, e in enumerate(ended) if e == want]
            if idx:
                out[idx] = fn([texts[i] for i in idx])
        return out


@dataclass(frozen=True)
class SMCState:
    """Particles of P prompts, N each, after ``t`` tokens. Tensors are CPU; ``decode`` holds the
    prior's rows (KV cache) of the particles still running, row r being particle ``row_particle[r]``
    (flat index p·N + i); rows of ended particles are dropped at the next ``reorder``."""

    t: int
    tokens: torch.Tensor  # (P, N, W) int64, EOS-padded; W >= t grows with the run
    lengths: torch.Tensor  # (P, N) int64
    log_prior: torch.Tensor  # (P, N) float64 log pi0(x_1:t)
    log_weights: torch.Tensor  # (P, N) float64 unnormalised; log-mean-exp = running log Ẑ
    psi: torch.Tensor  # (P, N) float64 potential of the current prefix (r(x) once ended)
    ended: torch.Tensor  # (P, N) bool: reached EOS or max_new_tokens
    decode: DecodeState | None  # (b, V) rows of a step-wise prior; None on sequence-level priors
    row_particle: torch.Tensor  # (b,) int64 flat particle index of each decode row

    @property
    def running(self) -> torch.Tensor:
        """(P, N) bool: not ended and alive (finite weight) — the particles still decoded."""
        return ~self.ended & ~torch.isneginf(self.log_weights)


class StepInfo(NamedTuple):
    ess: torch.Tensor  # (P,) ESS after reweighting, before resampling
    resampled: torch.Tensor  # (P,) bool
    ancestors: torch.Tensor  # (P, N) int64 (identity where not resampled)
    log_Z_increment: torch.Tensor  # (P,) float64 change of the running log Ẑ


class Proposal(NamedTuple):
    tokens: torch.Tensor  # (m,) int64 sampled token of each running particle
    potential: torch.Tensor  # (m,) float64 g(x_1:t): psi_t of the new prefix, or r(x) if it ended
    log_increment: torch.Tensor  # (m,) float64 incremental log-weight


def smc_init(prior: Prior, prompt_ids: list[list[int]], cfg: SMCConfig) -> SMCState:
    """N particles per prompt with weights 1 and psi_0 = 0; on a step-wise prior, N copies of every
    prompt's decode state (prompt encoded once), on a sequence-level prior no decode state. Token
    storage grows with the steps run (no (P, N, max_new_tokens) allocation up front)."""
    P, N = len(prompt_ids), cfg.num_particles
    zeros = torch.zeros(P, N, dtype=torch.float64)
    stepwise = isinstance(prior, StepwisePrior)
    return SMCState(
        t=0,
        tokens=torch.full((P, N, 0), prior.eos_token_ids[0], dtype=torch.long),
        lengths=torch.zeros(P, N, dtype=torch.long),
        log_prior=zeros,
        log_weights=zeros,
        psi=zeros,
        ended=torch.zeros(P, N, dtype=torch.bool),
        decode=prior.start(prompt_ids, copies=N) if stepwise else None,
        row_particle=torch.arange(P * N),
    )


# --------------------------------------------------------------------------------------------------
# Proposals (orchestration: decode texts, call the reward/twist, sample)
# --------------------------------------------------------------------------------------------------
def _texts(prior: Prior, prefixes: list[list[int]], nxt: list[int], eos: set[int]) -> list[str]:
    """Text of each prefix followed by its next token (EOS contributes no text)."""
    return [prior.decode(p if v in eos else p + [v]) for p, v in zip(prefixes, nxt)]


def _score(targets: Targets, prefixes, nxt, ended: torch.Tensor, need: torch.Tensor, fallback: torch.Tensor, eos) -> torch.Tensor:
    """g for (prefix, next token) pairs: potentials where ``need``, ``fallback`` elsewhere. (n,) float64."""
    out = fallback.clone()
    idx = need.nonzero().squeeze(1).tolist()
    if idx:
        texts = _texts(targets.prior, [prefixes[i] for i in idx], [nxt[i] for i in idx], eos)
        out[idx] = targets.potentials(texts, ended[idx].tolist())
    return out


def propose_bootstrap(targets, cfg, logprobs, prefixes, psi_prev, *, boundary: bool, generator) -> Proposal:
    """x_t ~ pi0(. | x_1:t-1); log w = (g(x_1:t) - psi_{t-1}) / beta.

    logprobs (m, V) of the running particles; prefixes: m token lists; psi_prev (m,) float64.
    """
    eos_ids = targets.prior.eos_token_ids
    last = len(prefixes[0]) + 1 == cfg.max_new_tokens if prefixes else False
    tok = draw_tokens(logprobs, generator=generator).tokens.cpu()  # (m,) q = pi0
    ended = torch.isin(tok, torch.tensor(eos_ids)) | last  # (m,)
    need = ended | (boundary and targets.twist is not None)
    g = _score(targets, prefixes, tok.tolist(), ended, need, psi_prev, set(eos_ids))  # (m,)
    return Proposal(tok, g, (g - psi_prev) / cfg.beta)


def propose_tilted(targets, cfg, logprobs, prefixes, psi_prev, *, boundary: bool, generator) -> Proposal:
    """x_t ~ q ∝ pi0 exp(phi/beta) with phi = Delta on the top-k tokens, 0 elsewhere; log w from
    :func:`tilted_log_weight` (the module docstring derives it)."""
    eos_ids = targets.prior.eos_token_ids
    eos = torch.tensor(eos_ids)
    m, V = logprobs.shape
    k = min(cfg.lookahead, V)
    last = len(prefixes[0]) + 1 == cfg.max_new_tokens if prefixes else False
    top = logprobs.topk(k, dim=-1)
    cand, top_lp = top.indices.cpu(), top.values.double().cpu()  # (m, k)
    cand_ended = torch.isin(cand, eos) | last  # (m, k)
    # Score the candidates that need it (ended ones: true reward; others: the twist at boundaries);
    # tokens with pi0 = 0 get no call.
    need = (cand_ended | (boundary and targets.twist is not None)) & torch.isfinite(top_lp)  # (m, k)
    g_c = _score(
        targets,
        [p for p in prefixes for _ in range(k)],
        cand.reshape(-1).tolist(),
        cand_ended.reshape(-1),
        need.reshape(-1),
        psi_prev.repeat_interleave(k),
        set(eos_ids),
    ).view(m, k)  # (m, k)
    delta_c = g_c - psi_prev[:, None]  # (m, k)
    # Rows where q has no mass (every token with pi0 > 0 is a candidate with Delta = -inf) die;
    # the kernel would refuse them, so they are drawn as anything and weighted -inf.
    covered = torch.isfinite(logprobs).sum(-1).cpu() <= k  # (m,) the candidates hold all of pi0's mass
    dead = covered & torch.isneginf(top_lp + delta_c / cfg.beta).all(-1)  # (m,)
    phi_c = delta_c.float().double() if logprobs.is_cuda else delta_c  # (m, k) phi exactly as q uses it (kernels: fp32)
    tok = cand[:, 0].clone()  # (m,) dead rows keep their most likely token
    log_norm = torch.full((m,), -math.inf, dtype=torch.float64)
    live = (~dead).nonzero().squeeze(1)
    if live.numel():
        dev = logprobs.device
        draw = draw_tokens(
            logprobs if live.numel() == m else logprobs.index_select(0, live.to(dev)), potential=phi_c[live].to(dev),
            candidates=cand[live].to(dev), beta=cfg.beta, generator=generator,
        )  # fmt: skip
        tok[live], log_norm[live] = draw.tokens.cpu(), draw.log_norm.double().cpu()
    hit_c = cand == tok[:, None]  # (m, k)
    hit = hit_c.any(-1)  # (m,)
    pos = hit_c.float().argmax(-1, keepdim=True)  # (m, 1)
    g = torch.where(hit, g_c.gather(1, pos).squeeze(1), psi_prev)  # (m,)
    # A sampled non-candidate: q used phi = 0 for it, its true Delta is evaluated now.
    ended = torch.isin(tok, eos) | last  # (m,)
    miss_need = ~hit & (ended | (boundary and targets.twist is not None)) & ~dead
    if bool(miss_need.any()):
        g = _score(targets, prefixes, tok.tolist(), ended, miss_need, g, set(eos_ids))
    delta = g - psi_prev  # (m,)
    phi = torch.where(hit, phi_c.gather(1, pos).squeeze(1), 0.0)  # (m,) the potential q used for the token
    log_inc = tilted_log_weight(log_norm, delta, phi, cfg.beta)
    return Proposal(tok, torch.where(torch.isneginf(log_inc), -math.inf, g), log_inc)


PROPOSALS: dict[str, Callable[..., Proposal]] = {"bootstrap": propose_bootstrap, "tilted": propose_tilted}


# --------------------------------------------------------------------------------------------------
# One step: propose + reweight, then (per prompt) resample
# --------------------------------------------------------------------------------------------------
def _take(x: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """Gather (P, N, ...) particles by (P, N) ancestor indices."""
    idx = ancestors.view(*ancestors.shape, *([1] * (x.dim() - 2))).expand(*ancestors.shape, *x.shape[2:])
    return x.gather(1, idx)


def _widen(tokens: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """(B, W) token storage at least ``width`` wide (doubling, so growth costs O(total) copies)."""
    if tokens.shape[1] >= width:
        return tokens.clone()
    extra = max(width, 2 * tokens.shape[1]) - tokens.shape[1]
    return torch.cat([tokens, torch.full((tokens.shape[0], extra), pad, dtype=tokens.dtype)], 1)


class Particles(NamedTuple):
    """The (P, N, ...) particle fields an SMC step rewrites."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    log_prior: torch.Tensor
    log_weights: torch.Tensor
    psi: torch.Tensor
    ended: torch.Tensor


def reweight_and_resample(
    before: torch.Tensor, new: Particles, cfg: SMCConfig, *, boundary: bool, generator, prompts, where: str
) -> tuple[Particles, torch.Tensor, StepInfo]:
    """After reweighting: diagnostics, dead prompts, then resampling where the ESS is low.

    ``before`` (P,) is the running log Ẑ before the step. Returns the (resampled) particles, which
    of them still run (P, N), and the step's info. Raises DegenerateWeightsError naming ``where``
    and the prompts whose particles all have weight 0.
    """
    P, N = new.lengths.shape
    stats = normalize_log_weights(new.log_weights)
    if bool(stats.degenerate.any()):
        bad = stats.degenerate.nonzero().squeeze(1).tolist()
        raise DegenerateWeightsError(
            f"SMC {where}: every one of the {N} particles of prompt(s) "
            f"{', '.join(prompt_name(prompts, p) for p in bad)} has weight 0 (log-weight -inf: the "
            "reward or the twist is -inf on all of them); use more particles, the tilted proposal, or relax the constraint",
            rows=bad,
        )
    still = ~new.ended & ~torch.isneginf(new.log_weights)  # (P, N) running after this step
    decide = resample_decision(stats.ess, still.any(-1), N, cfg.ess_threshold) if boundary else torch.zeros(P, dtype=torch.bool)
    ancestors, log_weights = resample_weights(new.log_weights, decide, cfg.resampling, generator=generator)
    out = new._replace(log_weights=log_weights)
    if bool(decide.any()):
        out = Particles(*(x if name == "log_weights" else _take(x, ancestors) for name, x in zip(Particles._fields, out)))
        still = _take(still, ancestors)
    return out, still, StepInfo(stats.ess, decide, ancestors, stats.log_mean - before)


def smc_step(
    state: SMCState, cfg: SMCConfig, targets: Targets, *, generator: torch.Generator | None, prompts=None
) -> tuple[SMCState, StepInfo]:
    """Token step on a step-wise prior: extend every running particle by one token, reweight,
    resample where the ESS is low (checked every ``block_size`` tokens).

    ``state.decode`` is consumed (``prior.extend`` / ``prior.reorder`` may reuse its KV cache).
    Raises DegenerateWeightsError when every particle of a prompt has weight 0 after this step.
    """
    prior, t = targets.prior, state.t
    P, N = state.lengths.shape
    T = cfg.max_new_tokens

    def flat(x):  # (P, N, ...) -> (P·N, ...)
        return x.reshape(P * N, *x.shape[2:])

    boundary = (t + 1) % cfg.block_size == 0

    running = flat(state.running)  # (P·N,)
    rows = running[state.row_particle].nonzero().squeeze(1)  # decode rows of running particles (m,)
    pid = state.row_particle[rows]  # (m,) flat particle ids
    prefixes = flat(state.tokens)[pid, :t].tolist()
    psi_prev = flat(state.psi)[pid]  # (m,)
    logprobs = state.decode.logprobs  # (m, V)
    if rows.numel() != logprobs.shape[0]:
        logprobs = logprobs.index_select(0, rows.to(prior.device))
    prop = PROPOSALS[cfg.proposal](targets, cfg, logprobs, prefixes, psi_prev, boundary=boundary, generator=generator)

    eos = torch.tensor(prior.eos_token_ids)
    tok_lp = logprobs.gather(1, prop.tokens.to(prior.device)[:, None]).squeeze(1).double().cpu()  # (m,)
    ended_now = torch.isin(prop.tokens, eos) | (t + 1 == T)  # (m,)
    tokens, lengths = _widen(flat(state.tokens), t + 1, prior.eos_token_ids[0]), flat(state.lengths).clone()
    tokens[pid, t] = prop.tokens
    lengths[pid] = t + 1
    new = Particles(
        tokens.view(P, N, -1),
        lengths.view(P, N),
        flat(state.log_prior).index_add(0, pid, tok_lp).view(P, N),
        flat(state.log_weights).index_add(0, pid, prop.log_increment).view(P, N),
        flat(state.psi).index_copy(0, pid, prop.potential).view(P, N),
        flat(state.ended).index_copy(0, pid, ended_now).view(P, N),
    )
    before = normalize_log_weights(state.log_weights).log_mean  # (P,)
    new, still, info = reweight_and_resample(
        before, new, cfg, boundary=boundary, generator=generator, prompts=prompts,
        where=f"step {t + 1} (token {t + 1} of max_new_tokens={T})",
    )  # fmt: skip

    # Decode rows: one reorder when resampling changes them or when ended rows are half the batch.
    src = (info.ancestors + torch.arange(P)[:, None] * N).reshape(-1)  # (P·N,) flat ancestor of each particle
    keep = flat(still).nonzero().squeeze(1)  # (m',) particles decoded next
    decode, row_particle = state.decode, state.row_particle
    if keep.numel() and (bool(info.resampled.any()) or 2 * keep.numel() <= row_particle.numel()):
        row_of = torch.full((P * N,), -1, dtype=torch.long)
        row_of[row_particle] = torch.arange(row_particle.numel())
        decode = prior.reorder(decode, row_of[src[keep]].to(prior.device))  # consumes the old rows
        row_particle = keep
    if keep.numel():
        feed = flat(new.tokens)[row_particle, t]  # ended rows left in the batch get their (EOS) token
        decode = prior.extend(decode, feed.to(prior.device))
    return replace(state, t=t + 1, decode=decode, row_particle=row_particle, **new._asdict()), info


def smc_block_step(
    state: SMCState, cfg: SMCConfig, targets: Targets, *, prompt_rows: list[list[int]], generator, prompts=None
) -> tuple[SMCState, StepInfo]:
    """Block step on any prior (sequence level): extend every running particle by up to
    ``block_size`` tokens with ``prior.continue_prefixes`` (the bootstrap proposal q = pi0, so the
    incremental log-weight is (g(x_1:t+B) - psi_t) / beta), then reweight and resample.

    ``prompt_rows`` holds the prompt of each flat particle (P·N lists). Running particles all have
    length ``state.t``; one that draws EOS inside the block ends there with its true reward.
    """
    prior, t = targets.prior, state.t
    P, N = state.lengths.shape
    T = cfg.max_new_tokens
    k = min(cfg.block_size, T - t)
    pad = prior.eos_token_ids[0]
    eos = torch.tensor(prior.eos_token_ids)

    def flat(x):
        return x.reshape(P * N, *x.shape[2:])

    pid = flat(state.running).nonzero().squeeze(1)  # (m,)
    ids = pid.tolist()
    prefixes = flat(state.tokens)[pid, :t].tolist()
    ext = prior.continue_prefixes([prompt_rows[i] for i in ids], prefixes, k, generator=generator)
    new_tok, new_len = ext.tokens.cpu(), ext.lengths.cpu()  # (m, K), (m,)
    tokens, lengths = _widen(flat(state.tokens), t + k, pad), flat(state.lengths).clone()
    tokens[pid, t : t + new_tok.shape[1]] = new_tok
    lengths[pid] = t + new_len
    last = new_tok.gather(1, (new_len - 1).clamp(min=0)[:, None]).squeeze(1)  # (m,)
    ended_now = torch.isin(last, eos) | (t + new_len >= T)  # (m,)
    psi_prev = flat(state.psi)[pid]  # (m,)
    need = ended_now | (targets.twist is not None)
    g = psi_prev.clone()
    idx = need.nonzero().squeeze(1).tolist()
    if idx:
        rows = tokens[pid[idx]].tolist()
        texts = [prior.decode([v for v in row[: t + int(new_len[j])] if v not in set(prior.eos_token_ids)]) for row, j in zip(rows, idx)]
        g[idx] = targets.potentials(texts, ended_now[idx].tolist())
    new = Particles(
        tokens.view(P, N, -1),
        lengths.view(P, N),
        flat(state.log_prior).index_add(0, pid, ext.token_log_probs.double().sum(-1).cpu()).view(P, N),
        flat(state.log_weights).index_add(0, pid, (g - psi_prev) / cfg.beta).view(P, N),
        flat(state.psi).index_copy(0, pid, g).view(P, N),
        flat(state.ended).index_copy(0, pid, ended_now).view(P, N),
    )
    before = normalize_log_weights(state.log_weights).log_mean  # (P,)
    new, _, info = reweight_and_resample(
        before, new, cfg, boundary=True, generator=generator, prompts=prompts,
        where=f"block ending at token {t + k} of max_new_tokens={T}",
    )  # fmt: skip
    return replace(state, t=t + k, **new._asdict()), info


def _apply_deferred_rewards(state: SMCState, infos: list[StepInfo], texts, reward: Reward, beta: float):
    """The final reweighting of an untwisted run: every ended particle with finite weight gets
    exp(r(x)/beta) (one batched reward call); psi becomes r. Its log Ẑ increment is added to the
    last step's, so the increments still sum to log Ẑ."""
    P, N = state.lengths.shape
    alive = state.ended & ~torch.isneginf(state.log_weights)  # (P, N)
    idx = alive.reshape(-1).nonzero().squeeze(1).tolist()
    r = torch.full((P * N,), -math.inf, dtype=torch.float64)
    if idx:
        r[idx] = reward([texts[i // N][i % N] for i in idx])
    r = r.view(P, N)
    before = normalize_log_weights(state.log_weights).log_mean
    log_weights = torch.where(alive, state.log_weights + r / beta, -math.inf)
    after = normalize_log_weights(log_weights).log_mean
    if infos:
        last = infos[-1]
        infos = infos[:-1] + [last._replace(log_Z_increment=last.log_Z_increment + (after - before))]
    return replace(state, log_weights=log_weights, psi=torch.where(alive, r, state.psi)), infos


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------
def resolve_twist(post, twist) -> Reward | None:
    """"auto": the reward if it accepts prefixes, else None (zero twist); None: zero; a Reward or
    a function of partial texts (-inf allowed where no completion can have finite reward)."""
    if isinstance(twist, str):
        if twist != "auto":
            raise ValueError(f'twist must be "auto", None, a Reward or a function of texts, got {twist!r}')
        return post.reward if post.reward.accepts_prefixes else None
    if twist is None or isinstance(twist, Reward):
        return twist
    if callable(twist):
        return CallableReward(twist, name=getattr(twist, "__name__", "twist"), accepts_prefixes=True)
    raise ValueError(f'twist must be "auto", None, a Reward or a function of texts, got {twist!r}')


@register_sampler("smc")
def sequential_monte_carlo(
    post,
    prompts,
    *,
    n: int,
    max_new_tokens: int,
    generator,
    progress: bool = False,
    ess_threshold: float = 0.5,  # resample a prompt when its ESS < ess_threshold · n (1: always, 0: never)
    resampling: str = "systematic",  # multinomial | stratified | systematic | residual
    twist="auto",  # "auto" (reward if it accepts prefixes, else 0) | None | Reward | fn(texts)
    proposal: str = "bootstrap",  # "bootstrap" (the prior) | "tilted" (look-ahead; step-wise priors)
    lookahead: int = 8,  # candidates per particle and step scored by the tilted proposal
    block_size: int = 1,  # tokens between reweighting / resampling (sequence-level priors: per call)
    return_ancestry: bool = False,  # res.info["ancestry"] (P, n, steps)
    callback: Callable | None = None,  # fn(StepReport) after every step (UIs, logs)
):
    """Twisted SMC over tokens (see the module docstring for the targets and weights).

    Returns
    -------
    SampleResult
        log_weights (P, n) normalised final weights; log_Z (P,) the SMC estimate; ess (P,) final.
        ``info``: "ess_per_step" (P, steps), "resampled" (P, steps) bool, "log_Z_increments"
        (P, steps) summing to log_Z, "ancestry" (P, n, steps) with ``return_ancestry``, and the
        options used. Particles killed by a -inf twist before ending report reward -inf.
    """
    prior = post.prior
    cfg = SMCConfig(
        beta=post.beta, num_particles=n, max_new_tokens=max_new_tokens, proposal=proposal, lookahead=lookahead,
        block_size=block_size, ess_threshold=ess_threshold, resampling=resampling,
    )  # fmt: skip
    stepwise = isinstance(prior, StepwisePrior)
    if proposal == "tilted" and not stepwise:
        raise ValueError(
            f"proposal='tilted' needs next-token distributions (a step-wise prior: HFPrior, CallablePrior); "
            f"{type(prior).__name__} gives sequences only: use proposal='bootstrap' with block_size=B"
        )
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable, got {callback!r}")
    targets = Targets(prior, post.reward, resolve_twist(post, twist))
    prompt_ids = prior.encode_prompts(prompts)
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    prompt_rows = [p for p in prompt_ids for _ in range(n)]

    state = smc_init(prior, prompt_ids, cfg)
    infos: list[StepInfo] = []
    bar = tqdm(total=max_new_tokens, desc="smc", unit="tok", disable=not progress, leave=False)
    while state.t < max_new_tokens and bool(state.running.any()):
        t0 = state.t
        if stepwise:
            state, info = smc_step(state, cfg, targets, generator=generator, prompts=prompts)
        else:
            state, info = smc_block_step(state, cfg, targets, prompt_rows=prompt_rows, generator=generator, prompts=prompts)
        infos.append(info)
        bar.update(state.t - t0)
        if callback is not None:
            stats = normalize_log_weights(state.log_weights)
            callback(StepReport(len(infos), state.t, prior.texts_of(state.tokens, state.lengths), stats.log_weights, stats.ess))
    bar.close()

    P = len(prompt_ids)
    T = max(1, int(state.lengths.max()))
    tokens = _widen(state.tokens.reshape(P * n, -1), T, prior.eos_token_ids[0])[:, :T].reshape(P, n, T)
    texts = prior.texts_of(tokens, state.lengths)
    if targets.defers_reward:  # the last target pi0 · exp(r/beta): apply the finite rewards now
        state, infos = _apply_deferred_rewards(state, infos, texts, post.reward, cfg.beta)
    stats = normalize_prompts(state.log_weights, prompts, what="SMC weights")
    rewards = torch.where(state.ended, state.psi, -math.inf)  # killed before ending: -inf
    cont = Continuations(tokens, state.lengths, state.log_prior.float(), texts)

    def stack(xs, shape):  # per-step tensors -> (..., steps)
        return torch.stack(xs, -1) if xs else torch.zeros(shape)

    info = {
        "proposal": proposal,
        "twist": "none" if targets.twist is None else targets.twist.name,
        "resampling": resampling,
        "block_size": block_size,
        "ess_per_step": stack([i.ess.float() for i in infos], (P, 0)),
        "resampled": stack([i.resampled for i in infos], (P, 0)).bool(),
        "log_Z_increments": stack([i.log_Z_increment for i in infos], (P, 0)).double(),
        "num_resampling": torch.stack([i.resampled for i in infos], -1).sum(-1) if infos else torch.zeros(P, dtype=torch.long),
    }
    if return_ancestry:
        info["ancestry"] = stack([i.ancestors for i in infos], (P, n, 0)).long()
    return make_result(
        post, "smc", prompts, cont, log_prior=state.log_prior, rewards=rewards,
        log_weights=stats.log_weights, log_Z=stats.log_mean, ess=stats.ess, info=info,
    )  # fmt: skip
