"""Step kinds of the one training loop: (what is trained, objective) -> draw a batch, return a loss.

``pst.train.fit`` owns the optimiser, the generator, checkpoints, metrics and the running log Z; a
:class:`Step` owns one step's draws and its loss. A step reads a :class:`StepInput` and returns a
:class:`StepOutput` (the loss with its graph to ``model.trainable_parameters()``, a metrics row,
the updated running log Z). Steps are found by :func:`get_step` in :data:`STEPS`, keyed by
(kind, objective) with kind "policy" (a :class:`~posterior.train.policy.Policy`) or "twist" (a
:class:`~posterior.twists.base.TrainableTwist`):

* ("policy", on-policy objective): x ~ q (no grad), the pure loss of :mod:`.objectives`;
* ("policy", "distill"): weighted samples of pi* from SMC / IS, weighted maximum likelihood;
* ("twist", "ctl"): with sampler "smc", one SMC run with the twist being trained: positives its
  final weighted particles, negatives its particles after each step t (weighted samples of the
  intermediate target pi^psi_t); with "is", N prior rollouts weighted both ways
  (:mod:`.twist_objectives`);
* ("twist", "regression" | "fudge"): prior rollouts and their rewards.

A new objective is one function ``run(StepInput) -> StepOutput`` and one :func:`register_step`.

Running log Z: every step that sees unbiased estimates Ẑ_b of Z = sum_x pi0(x) e^{r(x)/beta} folds
them in with :func:`update_log_Z` (a sample-weighted mean of Ẑ, still unbiased).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from posterior.diagnostics.weights import log_weight_stats
from posterior.train.objectives import OBJECTIVES, get_objective
from posterior.train.policy import Policy
from posterior.train.twist_objectives import (
    TWIST_OBJECTIVES,
    ctl_loss,
    ctl_negative_log_weights,
    get_twist_objective,
    live_positions,
)
from posterior.twists.base import TrainableTwist


class StepInput(NamedTuple):
    """What the loop hands a step (the step must not keep it)."""

    post: Any  # the Posterior: post.prior is pi0, post.beta, post.rewards(texts)
    model: Any  # what is trained (a Policy or a TrainableTwist)
    prompts: list[str] | None
    prompt_ids: list[list[int]]  # the prior's encoding of the prompts
    model_prompt_ids: list[list[int]]  # the model's encoding (a policy's; the prior's for twists)
    batch_size: int  # N samples per prompt
    max_new_tokens: int
    generator: torch.Generator  # every draw comes from it (resume replays it)
    log_Z: torch.Tensor  # (P,) float64 running log Ẑ
    count: torch.Tensor  # (P,) float64 samples behind it
    sampler: str  # "smc" | "is": the sampler of pi* (distill; ctl's positives)
    resample: bool  # distill: train on a multinomial resample
    sampler_options: dict  # options of that sampler
    step: int | None = None  # the step being taken (1-based), for messages


class StepOutput(NamedTuple):
    loss: torch.Tensor  # scalar with the graph
    metrics: dict  # one JSON-safe row (the loop adds step, objective, seconds)
    log_Z: torch.Tensor  # (P,) updated running log Ẑ
    count: torch.Tensor


class Step(NamedTuple):
    """One (kind, objective) of training."""

    kind: str  # "policy" | "twist"
    objective: str  # canonical name (checkpoints and metrics record it)
    run: Callable[[StepInput], StepOutput]
    min_batch_size: int = 1  # e.g. 2 for leave-one-out baselines
    progress_keys: tuple[str, ...] = ("reward_mean", "ess")  # metrics shown on the progress bar


STEPS: dict[tuple[str, str], Step] = {}


def register_step(step: Step) -> None:
    STEPS[(step.kind, step.objective)] = step


def model_kind(model) -> str:
    """"policy" or "twist": what ``fit`` trains (raises for anything else)."""
    if isinstance(model, Policy):
        return "policy"
    if isinstance(model, TrainableTwist):
        return "twist"
    raise ValueError(
        f"policy must come from posterior.train.policy_from, or be a trainable twist (pst.twists.learned); "
        f"got {type(model).__name__}"
    )


def get_step(model, objective: str) -> Step:
    kind = model_kind(model)
    if kind == "policy":
        if objective in TWIST_OBJECTIVES:
            raise ValueError(f"objective {objective!r} trains a twist (pst.twists.learned), not a policy")
        key = get_objective(objective).name  # validates and resolves aliases
    else:
        if objective not in TWIST_OBJECTIVES:
            raise ValueError(f"unknown twist objective {objective!r}; a twist trains with one of {sorted(TWIST_OBJECTIVES)}")
        key = objective
    return STEPS[(kind, key)]


# --- shared helpers -------------------------------------------------------------------------------
def num(x):
    """JSON-safe float: inf / nan as strings (json would write non-standard Infinity)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


def mean(x: torch.Tensor) -> float:
    return float(x.double().mean())


def update_log_Z(log_Z, count, batch_log_sum, n):
    """Running log of the sample-weighted mean of unbiased Ẑ: batch_log_sum (P,) = log sum_n w_n."""
    total = count + n
    prev = torch.where(count > 0, log_Z + torch.log(count.clamp(min=1)), torch.full_like(log_Z, -math.inf))
    return torch.logaddexp(prev, batch_log_sum) - torch.log(total), total


def _as_continuations(res):
    from posterior.priors.base import Continuations

    return Continuations(res.tokens, res.lengths, res.log_prior, res.texts)


def _sample_posterior(inp: StepInput):
    """Weighted samples of pi* from the configured sampler, drawn from the loop's generator."""
    return inp.post.sample(n=inp.batch_size, method=inp.sampler, max_new_tokens=inp.max_new_tokens, prompts=inp.prompts,
                           generator=inp.generator, **inp.sampler_options)  # fmt: skip


# --- policies ---------------------------------------------------------------------------------------
def _on_policy_step(obj, inp: StepInput) -> StepOutput:
    post, policy, N = inp.post, inp.model, inp.batch_size
    prior, beta, log_Z, count = post.prior, post.beta, inp.log_Z, inp.count
    with torch.no_grad():
        cont = policy.sample(inp.model_prompt_ids, N, inp.max_new_tokens, generator=inp.generator)
    log_pi0 = prior.log_prob(inp.prompt_ids, cont.tokens, cont.lengths).double().cpu()  # (P, N)
    rewards = post.rewards(cont.texts)  # (P, N) float64
    log_q = policy.log_prob(inp.model_prompt_ids, cont.tokens, cont.lengths, grad=True)  # (P, N) with the graph
    lq = log_q.detach().double().cpu()
    log_w = log_pi0 + rewards / beta - lq  # (P, N) log pi0 e^{r/beta} / q
    stats = log_weight_stats(log_w)
    log_Z, count = update_log_Z(log_Z, count, stats.log_mean + math.log(N), N)
    undefined = ~torch.isfinite(log_Z)  # (P,) prompts none of whose samples has had pi* > 0 yet
    if bool(undefined.any()):
        p = int(undefined.nonzero()[0])
        if obj.uses_log_Z:  # f-DPG cannot take a step without log Z
            raise ValueError(
                f"{obj.name}, step {inp.step}: no sample of prompt {p} has had positive posterior weight yet (every "
                "reward -inf), so log Z has no estimate; increase batch_size or relax the constraint"
            )
        # DPG: such a prompt gives no gradient (c = 0) until a sample satisfies the constraint, which
        # a rare constraint needs a few steps for; fit raises at the end if none ever does.
        warnings.warn(
            f"{obj.name}: no sample of some prompt has had positive posterior weight yet (every reward -inf): it gives "
            "no gradient and no KL / log Z estimate until one does",
            stacklevel=4,
        )
    dev = log_q.device
    loss, info = obj.loss(log_q, log_pi0.to(dev), rewards.to(dev), beta, log_Z=log_Z.to(dev) if obj.uses_log_Z else None)
    w = stats.log_weights.exp()  # (P, N) normalised
    fwd = torch.where(w > 0, w * log_w, torch.zeros((), dtype=torch.float64)).sum(-1) - log_Z  # (P,)
    rev = (-log_w).mean(-1) + log_Z
    est = (lambda x: None) if bool(undefined.any()) else (lambda x: num(mean(x)))  # noqa: E731 (undefined: None, not "nan")
    row = {
        "loss": float(loss.detach()), "samples": "policy", "reward_mean": num(mean(rewards)),
        "kl_prior": num(mean(lq - log_pi0)), "kl_target_forward": est(fwd), "kl_target_reverse": est(rev),
        "ess": est(stats.ess), "log_Z": est(log_Z), "log_Z_batch": num(mean(stats.log_mean)),
        "pseudo_reward_mean": est(info.pseudo_reward.cpu()),
        "zero_weight_prompts": int(stats.degenerate.sum()),  # prompts whose batch has no sample with pi* > 0
    }  # fmt: skip
    return StepOutput(loss, row, log_Z, count)


def _distill_step(inp: StepInput) -> StepOutput:
    from posterior.samplers.common import select

    post, policy, N, generator = inp.post, inp.model, inp.batch_size, inp.generator
    res = _sample_posterior(inp)
    cont_tokens, cont_lengths, lw = res.tokens, res.lengths, res.log_weights.double()
    log_Z, count = update_log_Z(inp.log_Z, inp.count, res.log_Z.double() + math.log(N), N)
    log_w_target = res.log_prior.double() + res.rewards.double() / post.beta  # (P, N) unnormalised log pi*
    if inp.resample:
        idx = torch.multinomial(lw.exp().float().to(generator.device), N, replacement=True, generator=generator).cpu()
        cont, _ = select(_as_continuations(res), idx)
        cont_tokens, cont_lengths = cont.tokens, cont.lengths
        log_w_target = log_w_target.gather(1, idx)
        lw = torch.full_like(lw, -math.log(N))
    log_q = policy.log_prob(inp.model_prompt_ids, cont_tokens, cont_lengths, grad=True)  # (P, N)
    loss, _ = get_objective("distill").loss(log_q, lw.to(log_q.device))
    lq = log_q.detach().double().cpu()
    w = lw.exp()
    fwd = torch.where(w > 0, w * (log_w_target - lq), torch.zeros((), dtype=torch.float64)).sum(-1) - log_Z
    row = {
        "loss": float(loss.detach()), "samples": inp.sampler, "reward_mean": num(mean(res.reward_mean())),
        "kl_prior": None, "kl_target_forward": num(mean(fwd)), "kl_target_reverse": None,
        "ess": num(mean(res.ess)), "log_Z": num(mean(log_Z)), "log_Z_batch": num(mean(res.log_Z)),
        "pseudo_reward_mean": None,
    }  # fmt: skip
    return StepOutput(loss, row, log_Z, count)


for _obj in OBJECTIVES.values():
    if _obj.on_policy:
        register_step(Step("policy", _obj.name, (lambda o: lambda inp: _on_policy_step(o, inp))(_obj), min_batch_size=2,
                           progress_keys=("reward_mean", "kl_prior", "ess")))  # fmt: skip
register_step(Step("policy", "distill", _distill_step, progress_keys=("reward_mean", "kl_prior", "ess")))


# --- twists -----------------------------------------------------------------------------------------
def _prior_rollouts(inp: StepInput):
    """N continuations per prompt from pi0 with their rewards and psi (with the graph), and the
    importance weights e^{r/beta} of pi* against pi0."""
    post, N = inp.post, inp.batch_size
    with torch.no_grad():
        cont = post.prior.sample(inp.prompt_ids, N, inp.max_new_tokens, generator=inp.generator)
    rewards = post.rewards(cont.texts)  # (P, N) float64
    psi = inp.model.prefix_values(inp.prompt_ids, cont.tokens, cont.lengths, grad=True)  # (P, N, T)
    live = live_positions(cont.lengths, cont.tokens.shape[-1]).to(psi.device)
    stats = log_weight_stats(rewards / post.beta)  # pi*/pi0 up to Z: IS of pi* with pi0 as proposal
    return cont, rewards, psi, live, stats


def _twist_rows(loss, info, log_Z, extra) -> dict:
    return {"loss": float(loss.detach()), **extra, "log_Z": num(mean(log_Z)), "live_positions": int(info.positions),
            "residual": num(info.residual), "kl_prior": None, "kl_target_forward": None, "kl_target_reverse": None}  # fmt: skip


def _ctl_smc_options():
    """The sampler_options ctl's SMC run takes, derived from the classes that own them: the model
    options of SMC (``SMCModelOptions``) but the twist (the one being trained), ``decode_ahead``
    (off: the engine owns the steps) and ``ess_threshold`` (the engine's), and the engine's
    resampling rule (``EngineConfig``, without the problem's size)."""
    from posterior.samplers.engine import EngineConfig
    from posterior.samplers.options import SMCModelOptions

    model = [n for n in SMCModelOptions.table() if n not in ("twist", "decode_ahead", "ess_threshold")]
    engine = [n for n in EngineConfig.table() if n not in ("beta", "num_particles", "max_new_tokens")]
    return model, engine


def _smc_with_twist(inp: StepInput):
    """One SMC run of pi* with the twist being trained (no gradients): the final weighted particles
    and the particles after every step (weighted samples of that step's target pi^psi_t). Options
    not given take SMC's defaults, but the proposal: "tilted" for a dense twist on a step-wise prior."""
    from posterior.priors.base import NEXT_TOKEN
    from posterior.samplers.engine import EngineConfig, run
    from posterior.samplers.smc import build_model

    post, twist, N = inp.post, inp.model, inp.batch_size
    opts = dict(inp.sampler_options)
    model_names, engine_names = _ctl_smc_options()
    unknown = sorted(set(opts) - set(model_names) - set(engine_names))
    if unknown:
        raise ValueError(f"sampler_options {unknown} do not apply to ctl's SMC; it takes {sorted(model_names + engine_names)}")
    model_opts = {"proposal": "tilted" if (twist.dense and post.prior.has(NEXT_TOKEN)) else "bootstrap",
                  **{k: v for k, v in opts.items() if k in model_names}}  # fmt: skip
    cfg = EngineConfig(beta=post.beta, num_particles=N, max_new_tokens=inp.max_new_tokens,
                       **{k: v for k, v in opts.items() if k in engine_names})  # fmt: skip
    model = build_model(post, inp.prompt_ids, cfg, twist=twist, decode_ahead=False, **model_opts)
    per_step = []  # (t, Particles) after each step; the engine never mutates particle tensors
    with torch.no_grad():
        state, infos = run(model, inp.prompt_ids, cfg, generator=inp.generator, pad=post.prior.eos_token_ids[0],
                           callback=lambda st, info: per_step.append((st.t, st.particles)))  # fmt: skip
    return state.particles, per_step


def _negatives_from_steps(per_step, P: int, N: int, W: int, pad: int):
    """Stack the step-t particle sets into rows (P, S·N, W): row s·N + n is particle n after step
    s, live only at column t_s - 1 (if still running), with its log-weight in that column and -inf
    in the others, so that ctl_loss normalises each column over that step's particles."""
    S = len(per_step)
    tokens = torch.full((P, S * N, W), pad, dtype=torch.long)
    lengths = torch.zeros(P, S * N, dtype=torch.long)
    live = torch.zeros(P, S * N, W, dtype=torch.bool)
    log_w = torch.full((P, S * N, W), -math.inf, dtype=torch.float64)
    for s, (t, p) in enumerate(per_step):
        rows = slice(s * N, (s + 1) * N)
        w = min(W, p.tokens.shape[-1])
        tokens[:, rows, :w] = p.tokens[..., :w]
        lengths[:, rows] = p.lengths
        live[:, rows, t - 1] = ~p.ended & (p.lengths == t)
        log_w[:, rows, t - 1] = p.log_weights
    return tokens, lengths, live, log_w


def _ctl_step(inp: StepInput) -> StepOutput:
    """``inp.sampler`` "is": positives and negatives are the same N prior rollouts, weighted
    e^{r/beta} (pi*) and, per t, e^{psi_t/beta} or e^{r/beta} (pi^psi_t). "smc": one SMC run with
    the current twist (``sampler_options``: ess_threshold, resampling, proposal — "tilted" for a
    dense twist on a step-wise prior by default —, lookahead, block_size): positives are its final
    weighted particles, negatives its particles after every step t, weighted samples of pi^psi_t
    (Zhao et al. 2024)."""
    post, twist, N, beta = inp.post, inp.model, inp.batch_size, inp.post.beta
    if inp.sampler == "is":
        cont, rewards, psi_neg, live_neg, stats = _prior_rollouts(inp)
        psi_pos, live_pos, log_w_pos = psi_neg, live_neg, stats.log_weights.to(psi_neg.device)
        log_w_neg = ctl_negative_log_weights(psi_neg.detach(), live_neg, rewards.to(psi_neg.device), beta)
        batch_log_Z, ess = stats.log_mean, stats.ess
        reward_mean = (stats.log_weights.exp() * torch.nan_to_num(rewards, neginf=0.0)).sum(-1)
    else:
        final, per_step = _smc_with_twist(inp)
        P = final.lengths.shape[0]
        W = max(1, int(final.lengths.max()))
        pos_tokens = final.tokens[..., :W]
        psi_pos = twist.prefix_values(inp.prompt_ids, pos_tokens, final.lengths, grad=True)  # (P, N, W)
        live_pos = live_positions(final.lengths, W).to(psi_pos.device)
        stats = log_weight_stats(final.log_weights)
        log_w_pos = stats.log_weights.to(psi_pos.device)
        tokens, lengths, live_neg, log_w_neg = _negatives_from_steps(per_step, P, N, W, post.prior.eos_token_ids[0])
        psi_neg = twist.prefix_values(inp.prompt_ids, tokens, lengths, grad=True)  # (P, S·N, W)
        live_neg, log_w_neg = live_neg.to(psi_neg.device), log_w_neg.to(psi_neg.device)
        rewards = torch.where(final.ended, final.psi, -math.inf)  # (P, N) r of the ended particles
        batch_log_Z, ess = stats.log_mean, stats.ess
        reward_mean = (stats.log_weights.exp() * torch.nan_to_num(rewards, neginf=0.0)).sum(-1)
    loss, info = ctl_loss(psi_pos, live_pos, log_w_pos, psi_neg, live_neg, log_w_neg, beta)
    log_Z, count = update_log_Z(inp.log_Z, inp.count, batch_log_Z + math.log(N), N)
    neg_ess = log_weight_stats(log_w_neg.detach().cpu().transpose(1, 2)).ess  # (P, W) per-t ESS of the negatives
    any_live = live_neg.cpu().any(1)  # (P, W) positions where some negative is live
    row = _twist_rows(loss, info, log_Z, {
        "samples": inp.sampler, "reward_mean": num(mean(reward_mean)), "ess": num(mean(ess)),
        "log_Z_batch": num(mean(batch_log_Z)),
        "ess_negatives": num(float(neg_ess[any_live].double().mean())) if bool(any_live.any()) else None,
    })  # fmt: skip
    return StepOutput(loss, row, log_Z, count)


def _regression_step(name: str):
    obj = get_twist_objective(name)

    def run(inp: StepInput) -> StepOutput:
        cont, rewards, psi, live, stats = _prior_rollouts(inp)
        loss, info = obj.loss(psi, live, rewards.to(psi.device), inp.post.beta)
        log_Z, count = update_log_Z(inp.log_Z, inp.count, stats.log_mean + math.log(inp.batch_size), inp.batch_size)
        row = _twist_rows(loss, info, log_Z, {
            "samples": "prior", "reward_mean": num(mean(torch.nan_to_num(rewards, neginf=0.0))), "ess": num(mean(stats.ess)),
            "log_Z_batch": num(mean(stats.log_mean)),
        })  # fmt: skip
        return StepOutput(loss, row, log_Z, count)

    return run


register_step(Step("twist", "ctl", _ctl_step, progress_keys=("loss", "ess", "ess_negatives")))
register_step(Step("twist", "regression", _regression_step("regression"), progress_keys=("loss", "residual")))
register_step(Step("twist", "fudge", _regression_step("fudge"), progress_keys=("loss", "residual")))


def check_twist(post, twist: TrainableTwist, max_new_tokens: int, *, resample: bool = False) -> None:
    """A twist trains for ``post.prior`` at ``max_new_tokens`` (psi* depends on the horizon)."""
    if resample:
        raise ValueError("distill_resample applies to objective='distill' (policies); twist objectives use weighted samples")
    prior = getattr(twist, "prior", None)
    if prior is not None and prior is not post.prior and prior.vocabulary_key() != post.prior.vocabulary_key():
        raise ValueError("the twist was built for a prior with a different tokenizer/vocabulary than post.prior")
    T = getattr(twist, "max_new_tokens", None)
    if T is not None and T != max_new_tokens:
        raise ValueError(
            f"the twist was built for max_new_tokens={T}, got max_new_tokens={max_new_tokens}: the optimal twist "
            "depends on the horizon; build it with the same max_new_tokens"
        )


__all__ = ["STEPS", "Step", "StepInput", "StepOutput", "check_twist", "get_step", "model_kind", "register_step", "update_log_Z"]
