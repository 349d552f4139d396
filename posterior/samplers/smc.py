"""Sequential Monte Carlo over tokens with twisted intermediate targets ("smc"): the registered
sampler. It builds the model side (``posterior.samplers.smc_model``: proposal and potentials from
the posterior, the twist and the options) and runs the one engine (``posterior.samplers.engine``:
particles, weights, ancestry, resampling, log Ẑ). The math is in those two modules' docstrings;
in short:

    gamma_t(x_1:t) = pi0(x_1:t) · exp(psi_t(x_1:t) / beta)  while a particle runs,
    gamma(x)       = pi0(x) · exp(r(x) / beta)              once it has ended,

so the last target is exactly the unnormalised pi* whatever the (finite) twist, and

    log Ẑ = sum over resampling epochs e of log (1/N) sum_i W_i^(e)

is unbiased for Z = sum_x pi0(x) exp(r(x)/beta) (Del Moral 2004; Naesseth, Lindsten & Schön 2019).

Twists (``twist=``): "auto" (``pst.twists.from_reward(r)`` when ``r.accepts_prefixes``, else none:
the bootstrap particle filter of Gordon et al. 1993, with the finite reward deferred to the end),
None, a Reward (read on prefixes), a function of texts (``pst.twists.Callable``), or any
:class:`~posterior.twists.base.Twist` (dense twists make the tilted proposal one ``next_values``
call per step). A twist may be -inf only on prefixes none of whose completions has a finite reward;
SMC checks that where a particle dies of it (``check_twist``).

Proposals: "bootstrap" (q = pi0) on every prior; "tilted" (q ∝ pi0 exp(phi/beta), phi from the twist
on the ``lookahead`` most likely tokens, or on every token for a dense twist) on priors with
next-token distributions. Blocks: ``block_size=B`` reweights and checks resampling every B tokens;
on a prior with only the sequence-level capability (a serving engine) each block comes from the
prior: with ``decode_ahead`` each particle's continuation is drawn once and read block by block (a
request kept running in a streaming prior such as vLLM, or ``continue_prefixes`` ahead by several
blocks), and only the duplicates start anew after resampling (exactly block SMC; proof in
``smc_model``).

Resampling: per prompt, when ESS < ess_threshold·N (1 = every boundary, 0 = never), with a scheme
registered in ``posterior.samplers.resampling``. Per-step numerics go through ``posterior.kernels``
(Triton on CUDA, float64 CPU paths); weights are float64.

A prompt whose particles all die (a hard constraint none of them met) has Ẑ = 0 in this run: a
legitimate draw of the unbiased estimator (E[Ẑ] = Z counts the zeros; averaging only the runs that
survived biases Ẑ upwards). The other prompts run on; the run's result is built with log Ẑ = -inf
for those prompts (``info.degenerate`` flags them, ``info.dead_at_token`` says when) and,
since the caller asked for samples of pi* that do not exist, it raises
:class:`~posterior.errors.DegenerateWeightsError` naming the step and the prompts, with that
honest result as ``e.result`` (``pst.bounds`` uses it).

Hard constraints. ``Contains`` is 0/-inf with no prefix semantics: its auto twist is none, a
particle dies when it ends without the substring, and with ``proposal="tilted"`` an ending token is
proposed with its true reward. To steer towards such a constraint pass a finite twist favouring
prefixes that satisfy it, e.g. ``twist=lambda ts: [0.0 if "great" in t else -3.0 for t in ts]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from posterior.kernels import normalize_log_weights
from posterior.priors.base import NEXT_TOKEN, Continuations
from posterior.rewards.base import Reward
from posterior.samplers.callbacks import StepReport
from posterior.samplers.common import make_result, normalize_prompts, prompt_name
from posterior.results import Info
from posterior.samplers.engine import EngineConfig, Reference, resample_decision, resample_weights, stack_infos, widen
from posterior.samplers.engine import run as run_engine
from posterior.samplers.options import SMCModelOptions, SMCOptions
from posterior.samplers.registry import Method, register
from posterior.samplers.smc_model import BlockModel, Potentials, TokenModel, tilted_log_weight
from posterior.twists import Callable as CallableTwist
from posterior.twists import Twist, from_reward

# Re-exported: the pure numerics tests and variants use (they live in engine / smc_model).
__all__ = ["METHOD", "SMCInfo", "build_model", "resample_decision", "resample_weights", "resolve_twist", "run", "tilted_log_weight"]


def resolve_twist(post, twist) -> Twist | None:
    """"auto": ``from_reward(post.reward)`` if it accepts prefixes, else None (no twist); None; a
    Twist as it is; a Reward read on prefixes; a function of texts (-inf allowed where no completion
    can have a finite reward). ``twist`` is an option value already checked (``SMCModelOptions``)."""
    if isinstance(twist, str):  # "auto": the option's check refuses any other string
        return from_reward(post.reward) if post.reward.accepts_prefixes else None
    if twist is None or isinstance(twist, Twist):
        return twist
    if isinstance(twist, Reward):
        return from_reward(twist)
    if callable(twist):
        return CallableTwist(twist, name=getattr(twist, "__name__", "twist"))
    raise ValueError(f'twist must be "auto", None, a Twist, a Reward or a function of texts, got {twist!r}')


_M = SMCModelOptions  # the model options' defaults, written once (posterior.samplers.options)


def build_model(
    post, prompt_ids, cfg: EngineConfig | None = None, *, n: int | None = None, max_new_tokens: int | None = None,
    twist=_M.twist, proposal: str = _M.proposal, lookahead: int = _M.lookahead, block_size: int = _M.block_size,
    decode_ahead: bool | int = _M.decode_ahead, check_twist: bool = _M.check_twist,
):  # fmt: skip
    """The model side for ``post``'s prior: token steps where it has next-token distributions,
    blocks of ``continue_prefixes`` otherwise. ``cfg`` is the engine config the model is built
    for (beta, N and the horizon live there); without it, one is made from ``post.beta``, ``n``
    and ``max_new_tokens``. The model options are checked here, once (``SMCModelOptions``)."""
    prior = post.prior
    if cfg is None:
        cfg = EngineConfig(beta=post.beta, num_particles=n, max_new_tokens=max_new_tokens)
    o = SMCModelOptions(twist=twist, proposal=proposal, lookahead=lookahead, block_size=block_size,
                        decode_ahead=decode_ahead, check_twist=check_twist)  # fmt: skip
    stepwise = prior.has(NEXT_TOKEN)
    if o.proposal == "tilted" and not stepwise:
        raise ValueError(
            f"proposal='tilted' needs next-token distributions (a step-wise prior: HFPrior, CallablePrior); "
            f"{type(prior).__name__} gives sequences only: use proposal='bootstrap' with block_size=B"
        )
    pot = Potentials(
        prior=prior, reward=post.reward, twist=resolve_twist(post, o.twist), cfg=cfg,
        prompt_rows=[p for p in prompt_ids for _ in range(cfg.num_particles)], check_twist=o.check_twist,
    )  # fmt: skip
    if stepwise:
        return TokenModel(pot, proposal=o.proposal, lookahead=o.lookahead, block_size=o.block_size)
    return BlockModel(pot, block_size=o.block_size, decode_ahead=o.decode_ahead)


@dataclass(frozen=True, eq=False)
class SMCInfo(Info):
    """``res.info`` of ``method="smc"``; per-step arrays are (P, steps)."""

    proposal: str | None = None
    twist: str | None = None  # the twist's name ("none": no twist)
    resampling: str | None = None
    block_size: int | None = None
    ess_per_step: torch.Tensor | None = None  # (P, steps) ESS after each step, before resampling
    resampled: torch.Tensor | None = None  # (P, steps) bool
    log_Z_increments: torch.Tensor | None = None  # (P, steps) float64, summing to log Z
    num_resampling: torch.Tensor | None = None  # (P,) resampling steps
    ancestry: torch.Tensor | None = None  # (P, n, steps) with return_ancestry=True
    dead_at_token: torch.Tensor | None = None  # (P,) where every particle of a prompt died (degenerate runs)


def _info(state, infos, model, o: SMCOptions, P: int, n: int, **extra) -> SMCInfo:
    stacked = stack_infos(infos, P, n)
    if not o.return_ancestry:
        del stacked["ancestry"]
    twist = "none" if model.pot.twist is None else model.pot.twist.name
    return SMCInfo(proposal=o.proposal, twist=twist, resampling=o.resampling, block_size=o.block_size, **stacked, **extra)


def run(post, prompts, options: SMCOptions, *, n: int, max_new_tokens: int, generator, progress: bool = False):
    """Twisted SMC over tokens (see the module docstring for the targets and weights).

    Returns
    -------
    SampleResult
        log_weights (P, n) normalised final weights; log_Z (P,) the SMC estimate; ess (P,) final.
        ``info`` (:class:`SMCInfo`): ess_per_step (P, steps), resampled (P, steps) bool,
        log_Z_increments (P, steps) summing to log_Z, ancestry (P, n, steps) with
        ``return_ancestry``, and the options used. Particles killed by a -inf twist before ending
        report reward -inf.
    """
    o = options
    prior = post.prior
    cfg = EngineConfig(beta=post.beta, num_particles=n, max_new_tokens=max_new_tokens, ess_threshold=o.ess_threshold, resampling=o.resampling)
    prompt_ids = prior.encode_prompts(prompts)
    model = build_model(
        post, prompt_ids, cfg, twist=o.twist, proposal=o.proposal, lookahead=o.lookahead, block_size=o.block_size,
        decode_ahead=o.decode_ahead, check_twist=o.check_twist,
    )  # fmt: skip
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    reference = None
    if o.reference is not None:
        tokens, lengths = o.reference
        reference = Reference(torch.as_tensor(tokens, dtype=torch.long).cpu(), torch.as_tensor(lengths, dtype=torch.long).cpu())
    pad = prior.eos_token_ids[0]
    P = len(prompt_ids)

    bar = tqdm(total=max_new_tokens, desc="smc", unit="tok", disable=not progress, leave=False)
    steps = [0]

    def on_step(state, info):
        bar.update(state.t - bar.n)
        steps[0] += 1
        if o.callback is not None:
            p = state.particles
            stats = normalize_log_weights(p.log_weights)
            o.callback(StepReport(steps[0], state.t, prior.texts_of(p.tokens, p.lengths), stats.log_weights, stats.ess))

    state, infos = run_engine(
        model, prompt_ids, cfg, generator=generator, pad=pad, reference=reference, callback=on_step,
        name_prompt=lambda p: prompt_name(prompts, p), on_degenerate="keep",
    )  # fmt: skip
    bar.close()

    p = state.particles
    T = max(1, int(p.lengths.max()))
    tokens = widen(p.tokens.reshape(P * n, -1), T, pad)[:, :T].reshape(P, n, T)
    texts = prior.texts_of(tokens, p.lengths)
    rewards = torch.where(p.ended, p.psi, -math.inf)  # killed before ending: -inf
    if bool((state.dead_at > 0).any()):
        _raise_degenerate(post, prompts, state, infos, tokens, texts, rewards, model, o)
    stats = normalize_prompts(p.log_weights, prompts, what="SMC weights")
    cont = Continuations(tokens, p.lengths, p.log_prior.float(), texts)
    return make_result(
        post, "smc", prompts, cont, log_prior=p.log_prior, rewards=rewards,
        log_weights=stats.log_weights, log_Z=stats.log_mean, ess=stats.ess, info=_info(state, infos, model, o, P, n),
    )  # fmt: skip


METHOD = register(Method("smc", SMCOptions, SMCInfo, run, streams=True))


def _raise_degenerate(post, prompts, state, infos, tokens, texts, rewards, model, o: SMCOptions):
    """Every particle of some prompt died: raise DegenerateWeightsError naming the step(s) and the
    prompts, with the run's honest result as ``e.result`` (log Ẑ = -inf there, every weight 0,
    ``info.degenerate``)."""
    from posterior.diagnostics.weights import log_weight_stats
    from posterior.errors import DegenerateWeightsError
    from posterior.results import SampleResult

    p = state.particles
    P, n = p.lengths.shape
    T = model.pot.max_new_tokens
    dead = state.dead_at > 0  # (P,)
    stats = log_weight_stats(p.log_weights)  # never raises: -inf / 0 on the dead prompts
    info = _info(state, infos, model, o, P, n, degenerate=dead, dead_at_token=state.dead_at.clone(), ess=stats.ess.float())
    result = SampleResult(
        method="smc", beta=post.beta, prompts=None if prompts is None else list(prompts), texts=texts, tokens=tokens,
        lengths=p.lengths, log_weights=stats.log_weights.float(), rewards=rewards, log_prior=p.log_prior.float(),
        log_Z=torch.where(dead, -math.inf, stats.log_mean.double()), ess=stats.ess.float(), info=info,
        prior=post.prior.describe(),
    )  # fmt: skip
    block_size = o.block_size
    groups: dict[int, list[int]] = {}
    for row in dead.nonzero().squeeze(1).tolist():
        groups.setdefault(int(state.dead_at[row]), []).append(row)
    where = "; ".join(
        (f"SMC step {t} (token {t} of max_new_tokens={T})" if block_size == 1 else f"SMC block ending at token {t} of max_new_tokens={T}")
        + f": every one of the {n} particles of prompt(s) {', '.join(prompt_name(prompts, r) for r in rows)} has weight 0"
        for t, rows in sorted(groups.items())
    )  # fmt: skip
    err = DegenerateWeightsError(
        f"{where} (log-weight -inf: the reward or the twist is -inf on all of them), so there are no samples of pi* "
        "to return for them. This run's estimate for them is Z^ = 0 (log Z^ = -inf), a legitimate draw of the unbiased "
        "estimator, kept in e.result (info['degenerate'] flags the prompts): to estimate log Z, keep such runs (pst.bounds "
        "does) — retrying until a run survives biases log Z^ upwards. For samples, use more particles or "
        "proposal='tilted' with a twist that favours the constraint, or relax the constraint",
        rows=dead.nonzero().squeeze(1).tolist(),
    )
    err.result = result
    raise err
