"""Self-normalised importance sampling (SIR without the resampling step).

Draw x_i ~ q (the prior by default, or any ``proposal`` prior over the same tokens), weight

    log w_i = log pi0(x_i) + r(x_i)/beta - log q(x_i),     log Ẑ = log (1/N) sum_i w_i,

which is unbiased for Z (so log Ẑ is biased low by Jensen, consistent as N grows). With the prior
as proposal the weights are exp(r/beta). With a fine-tuned model as ``proposal``, the ESS and
log Ẑ say how close that model is to pi*: this is how sampled and fine-tuned posteriors are compared.
A proposal that gives probability 0 where the prior does not is refused (``check_support``): its
weights could never see that part of pi*.

A prompt none of whose n draws has positive weight (a hard constraint none met) has Ẑ = 0 in this
run, an honest draw of the unbiased estimator: the sampler raises
:class:`~posterior.errors.DegenerateWeightsError` (there are no samples of pi* to return) with the
run's result as ``e.result`` (log Ẑ = -inf there, ``info.degenerate``), as SMC does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posterior.errors import DegenerateWeightsError
from posterior.results import Info
from posterior.samplers.common import draw, make_result, tilted_weights
from posterior.samplers.options import ISOptions
from posterior.samplers.registry import Method, register


@dataclass(frozen=True, eq=False)
class ISInfo(Info):
    """``res.info`` of ``method="is"``."""

    proposal: str | None = None  # "prior", or the proposal prior's class name
    proposal_support: str | None = None  # how the proposal's support was checked (with a proposal)


def run(post, prompts, options: ISOptions, *, n: int, max_new_tokens: int, generator, progress: bool = False):
    proposal = options.proposal  # default: the prior itself
    d = draw(post, prompts, n, max_new_tokens, generator=generator, proposal=proposal, progress=progress)
    try:
        tw = tilted_weights(d, post.beta, prompts, what="importance weights")
    except DegenerateWeightsError as e:
        e.result = _degenerate_result(post, prompts, d, proposal)
        raise DegenerateWeightsError(
            f"{e}. This run's estimate for them is Z^ = 0 (log Z^ = -inf), a legitimate draw of the unbiased estimator, "
            "kept in e.result (info['degenerate'] flags the prompts); averaging only runs that found a sample biases "
            "Z^ upwards",
            rows=e.rows,
        ) from e
    info = ISInfo(proposal="prior" if proposal is None else type(proposal).__name__,
                  proposal_support=None if proposal is None else d.support)  # fmt: skip
    return make_result(
        post, "is", prompts, d.cont,
        log_prior=d.log_prior, rewards=d.rewards, log_weights=tw.stats.log_weights, log_Z=tw.log_Z, ess=tw.stats.ess,
        kl=tw.kl, exact_scale=True, info=info,
    )  # fmt: skip


METHOD = register(Method("is", ISOptions, ISInfo, run, streams=True))


def _degenerate_result(post, prompts, d, proposal):
    """The run's result where some prompt has no draw of positive weight: log Ẑ = -inf, weights 0,
    ESS 0 there (the other prompts as usual), ``info["degenerate"]`` flagging them."""
    from posterior.diagnostics.tilt import reward_shift, scaled
    from posterior.diagnostics.weights import log_weight_stats
    from posterior.results import SampleResult

    shift = reward_shift(d.rewards)
    stats = log_weight_stats(d.relative_log_weights(post.beta, shift))
    dead = stats.degenerate
    log_Z = torch.where(dead, -math.inf, scaled(shift, post.beta) + stats.log_mean)
    info = ISInfo(proposal="prior" if proposal is None else type(proposal).__name__, degenerate=dead, ess=stats.ess.float())
    return SampleResult(
        method="is", beta=post.beta, prompts=None if prompts is None else list(prompts), texts=d.cont.texts,
        tokens=d.cont.tokens, lengths=d.cont.lengths, log_weights=stats.log_weights.float(), rewards=d.rewards,
        log_prior=d.log_prior.float(), log_Z=log_Z.double(), ess=stats.ess.float(), info=info, prior=post.prior.describe(),
    )  # fmt: skip
