"""Step kinds of the one training loop: (what is trained, objective) -> draw a batch, return a loss.

``pst.train.fit`` owns the optimiser, the generator, checkpoints, metrics and the running log Z; a
:class:`Step` owns one step's draws and its loss. A step reads a :class:`StepInput` and returns a
:class:`StepOutput` (the loss with its graph to ``model.trainable_parameters()``, a metrics row,
the updated running log Z). Steps are found by :func:`get_step` in :data:`STEPS`, keyed by
(kind, objective) with kind "policy" (a :class:`~posterior.train.policy.Policy`) or "twist" (a
:class:`~posterior.twists.base.TrainableTwist`):

* ("policy", on-policy objective): x ~ q (no grad), the pure loss of :mod:`.objectives`;
* ("policy", "distill"): weighted samples of pi* from SMC / IS, weighted maximum likelihood;
* ("twist", "ctl"): positives from SMC / IS of pi*, negatives from prior rollouts re-weighted to
  each intermediate target pi^psi_t (:mod:`.twist_objectives`);
* ("twist", "regression" | "fudge"): prior rollouts and their rewards.

A new objective is one function ``run(StepInput) -> StepOutput`` and one :func:`register_step`.

Running log Z: every step that sees unbiased estimates Ẑ_b of Z = sum_x pi0(x) e^{r(x)/beta} folds
them in with :func:`update_log_Z` (a sample-weighted mean of Ẑ, still unbiased).
"""

from __future__ import annotations

import math
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
    if obj.uses_log_Z and not bool(torch.isfinite(log_Z).all()):
        p = int((~torch.isfinite(log_Z)).nonzero()[0])
        raise ValueError(
            f"{obj.name}: no sample of prompt {p} has had positive posterior weight yet (every reward -inf), "
            "so log Z has no estimate; increase batch_size or relax the constraint"
        )
    dev = log_q.device
    loss, info = obj.loss(log_q, log_pi0.to(dev), rewards.to(dev), beta, log_Z=log_Z.to(dev) if obj.uses_log_Z else None)
    w = stats.log_weights.exp()  # (P, N) normalised
    fwd = torch.where(w > 0, w * log_w, torch.zeros((), dtype=torch.float64)).sum(-1) - log_Z  # (P,)
    rev = (-log_w).mean(-1) + log_Z
    row = {
        "loss": float(loss.detach()), "samples": "policy", "reward_mean": num(mean(rewards)),
        "kl_prior": num(mean(lq - log_pi0)), "kl_target_forward": num(mean(fwd)), "kl_target_reverse": num(mean(rev)),
        "ess": num(mean(stats.ess)), "log_Z": num(mean(log_Z)), "log_Z_batch": num(mean(stats.log_mean)),
        "pseudo_reward_mean": num(mean(info.pseudo_reward.cpu())),
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


def _ctl_step(inp: StepInput) -> StepOutput:
    """Positives: weighted samples of pi* (``inp.sampler``; with "is" the prior rollouts themselves,
    weighted by e^{r/beta}). Negatives: the prior rollouts, weighted per t to pi^psi_t."""
    post, twist, N, beta = inp.post, inp.model, inp.batch_size, inp.post.beta
    if inp.sampler == "is":
        cont, rewards, psi_neg, live_neg, stats = _prior_rollouts(inp)
        psi_pos, live_pos, log_w_pos = psi_neg, live_neg, stats.log_weights.to(psi_neg.device)
        batch_log_Z, ess, reward_mean = stats.log_mean, stats.ess, (stats.log_weights.exp() * torch.nan_to_num(rewards, neginf=0.0)).sum(-1)
    else:
        res = _sample_posterior(inp)
        psi_pos = twist.prefix_values(inp.prompt_ids, res.tokens, res.lengths, grad=True)  # (P, N, T)
        live_pos = live_positions(res.lengths, res.tokens.shape[-1]).to(psi_pos.device)
        log_w_pos = res.log_weights.double().to(psi_pos.device)
        batch_log_Z, ess, reward_mean = res.log_Z.double(), res.ess, res.reward_mean()
        cont, rewards, psi_neg, live_neg, _ = _prior_rollouts(inp)
    log_w_neg = ctl_negative_log_weights(psi_neg.detach(), live_neg, rewards.to(psi_neg.device), beta)
    loss, info = ctl_loss(psi_pos, live_pos, log_w_pos, psi_neg, live_neg, log_w_neg, beta)
    log_Z, count = update_log_Z(inp.log_Z, inp.count, batch_log_Z + math.log(N), N)
    neg_ess = log_weight_stats(log_w_neg.detach().cpu().transpose(1, 2)).ess  # (P, T) per-t ESS of the negatives
    any_live = live_neg.cpu().any(1)  # (P, T) positions where some negative is live
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


def check_twist(post, twist: TrainableTwist, max_new_tokens: int) -> None:
    """A twist trains for ``post.prior`` at ``max_new_tokens`` (psi* depends on the horizon)."""
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
