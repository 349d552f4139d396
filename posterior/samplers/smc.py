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
for those prompts (``info["degenerate"]`` flags them, ``info["dead_at_token"]`` says when) and,
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
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from posterior.kernels import normalize_log_weights
from posterior.priors.base import NEXT_TOKEN, Continuations
from posterior.rewards.base import Reward
from posterior.samplers.callbacks import StepReport
from posterior.samplers.common import make_result, normalize_prompts, prompt_name
from posterior.samplers.engine import EngineConfig, Reference, resample_decision, resample_weights, run, stack_infos, widen
from posterior.samplers.options import check_option
from posterior.samplers.registry import register_sampler
from posterior.samplers.smc_model import BlockModel, Potentials, TokenModel, tilted_log_weight
from posterior.twists import Callable as CallableTwist
from posterior.twists import Twist, from_reward

# Re-exported: the pure numerics tests and variants use (they live in engine / smc_model).
__all__ = ["resample_decision", "resample_weights", "resolve_twist", "sequential_monte_carlo", "tilted_log_weight"]


def resolve_twist(post, twist) -> Twist | None:
    """"auto": ``from_reward(post.reward)`` if it accepts prefixes, else None (no twist); None; a
    Twist as it is; a Reward read on prefixes; a function of texts (-inf allowed where no completion
    can have a finite reward)."""
    twist = check_option("smc", "twist", twist)  # a str is "auto"
    if isinstance(twist, str):
        return from_reward(post.reward) if post.reward.accepts_prefixes else None
    if twist is None or isinstance(twist, Twist):
        return twist
    if isinstance(twist, Reward):
        return from_reward(twist)
    if callable(twist):
        return CallableTwist(twist, name=getattr(twist, "__name__", "twist"))
    raise ValueError(f'twist must be "auto", None, a Twist, a Reward or a function of texts, got {twist!r}')


def build_model(post, prompt_ids, *, n, max_new_tokens, twist, proposal, lookahead, block_size, decode_ahead, check_twist):
    """The model side for ``post``'s prior: token steps where it has next-token distributions,
    blocks of ``continue_prefixes`` otherwise."""
    prior = post.prior
    proposal = check_option("smc", "proposal", proposal)
    lookahead = check_option("smc", "lookahead", lookahead)
    block_size = check_option("smc", "block_size", block_size)
    decode_ahead = check_option("smc", "decode_ahead", decode_ahead)
    check_twist = check_option("smc", "check_twist", check_twist)
    stepwise = prior.has(NEXT_TOKEN)
    if proposal == "tilted" and not stepwise:
        raise ValueError(
            f"proposal='tilted' needs next-token distributions (a step-wise prior: HFPrior, CallablePrior); "
            f"{type(prior).__name__} gives sequences only: use proposal='bootstrap' with block_size=B"
        )
    pot = Potentials(
        prior=prior, reward=post.reward, twist=resolve_twist(post, twist), beta=post.beta,
        prompt_rows=[p for p in prompt_ids for _ in range(n)], num_particles=n, max_new_tokens=max_new_tokens,
        check_twist=check_twist,
    )  # fmt: skip
    if stepwise:
        return TokenModel(pot, proposal=proposal, lookahead=lookahead, block_size=block_size)
    return BlockModel(pot, block_size=block_size, decode_ahead=decode_ahead)


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
    twist="auto",  # "auto" (reward if it accepts prefixes, else none) | None | Twist | Reward | fn(texts)
    proposal: str = "bootstrap",  # "bootstrap" (the prior) | "tilted" (look-ahead; step-wise priors)
    lookahead: int = 8,  # candidates per particle and step scored by the tilted proposal (non-dense twists)
    block_size: int = 1,  # tokens between reweighting / resampling (sequence-level priors: per block)
    decode_ahead: bool | int = True,  # sequence-level priors: True: streamed (STREAM) or adaptive; k: k blocks; False: one call per block
    check_twist: bool = True,  # roll out particles a twist kills: raise if a completion has finite reward
    return_ancestry: bool = False,  # res.info["ancestry"] (P, n, steps)
    callback: Callable | None = None,  # fn(StepReport) after every step (UIs, logs)
    reference=None,  # conditional SMC: (tokens (P, T), lengths (P,)) particle 0 of each prompt follows
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
    cfg = EngineConfig(beta=post.beta, num_particles=n, max_new_tokens=max_new_tokens, ess_threshold=ess_threshold, resampling=resampling)
    check_option("smc", "callback", callback)
    check_option("smc", "return_ancestry", return_ancestry)
    prompt_ids = prior.encode_prompts(prompts)
    model = build_model(
        post, prompt_ids, n=n, max_new_tokens=max_new_tokens, twist=twist, proposal=proposal, lookahead=lookahead,
        block_size=block_size, decode_ahead=decode_ahead, check_twist=check_twist,
    )  # fmt: skip
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    if reference is not None:
        tokens, lengths = reference
        reference = Reference(torch.as_tensor(tokens, dtype=torch.long).cpu(), torch.as_tensor(lengths, dtype=torch.long).cpu())
    pad = prior.eos_token_ids[0]
    P = len(prompt_ids)

    bar = tqdm(total=max_new_tokens, desc="smc", unit="tok", disable=not progress, leave=False)
    steps = [0]

    def on_step(state, info):
        bar.update(state.t - bar.n)
        steps[0] += 1
        if callback is not None:
            p = state.particles
            stats = normalize_log_weights(p.log_weights)
            callback(StepReport(steps[0], state.t, prior.texts_of(p.tokens, p.lengths), stats.log_weights, stats.ess))

    state, infos = run(
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
        _raise_degenerate(post, prompts, state, infos, tokens, texts, rewards, model, proposal, resampling, block_size, return_ancestry)
    stats = normalize_prompts(p.log_weights, prompts, what="SMC weights")
    cont = Continuations(tokens, p.lengths, p.log_prior.float(), texts)
    stacked = stack_infos(infos, P, n)
    info = {
        "proposal": proposal,
        "twist": "none" if model.pot.twist is None else model.pot.twist.name,
        "resampling": resampling,
        "block_size": block_size,
        **{k: v for k, v in stacked.items() if k != "ancestry"},
    }
    if return_ancestry:
        info["ancestry"] = stacked["ancestry"]
    return make_result(
        post, "smc", prompts, cont, log_prior=p.log_prior, rewards=rewards,
        log_weights=stats.log_weights, log_Z=stats.log_mean, ess=stats.ess, info=info,
    )  # fmt: skip


def _raise_degenerate(post, prompts, state, infos, tokens, texts, rewards, model, proposal, resampling, block_size, return_ancestry):
    """Every particle of some prompt died: raise DegenerateWeightsError naming the step(s) and the
    prompts, with the run's honest result as ``e.result`` (log Ẑ = -inf there, every weight 0,
    ``info["degenerate"]``)."""
    from posterior.diagnostics.weights import log_weight_stats
    from posterior.errors import DegenerateWeightsError
    from posterior.results import SampleResult

    p = state.particles
    P, n = p.lengths.shape
    T = model.pot.max_new_tokens
    dead = state.dead_at > 0  # (P,)
    stats = log_weight_stats(p.log_weights)  # never raises: -inf / 0 on the dead prompts
    stacked = stack_infos(infos, P, n)
    info = {
        "proposal": proposal, "twist": "none" if model.pot.twist is None else model.pot.twist.name,
        "resampling": resampling, "block_size": block_size,
        **{k: v for k, v in stacked.items() if k != "ancestry"},
        "degenerate": dead, "dead_at_token": state.dead_at.clone(),
    }  # fmt: skip
    if return_ancestry:
        info["ancestry"] = stacked["ancestry"]
    result = SampleResult(
        method="smc", beta=post.beta, prompts=None if prompts is None else list(prompts), texts=texts, tokens=tokens,
        lengths=p.lengths, log_weights=stats.log_weights.float(), rewards=rewards, log_prior=p.log_prior.float(),
        log_Z=torch.where(dead, -math.inf, stats.log_mean.double()), ess=stats.ess.float(), info=info,
        prior=post.prior.describe(),
    )  # fmt: skip
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
