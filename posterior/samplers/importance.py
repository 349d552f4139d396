"""Self-normalised importance sampling (SIR without the resampling step).

Draw x_i ~ q (the prior by default, or any ``proposal`` prior over the same tokens), weight

    log w_i = log pi0(x_i) + r(x_i)/beta - log q(x_i),     log Ẑ = log (1/N) sum_i w_i,

which is unbiased for Z (so log Ẑ is biased low by Jensen, consistent as N grows). With the prior
as proposal the weights are exp(r/beta). With a fine-tuned model as ``proposal``, the ESS and
log Ẑ say how close that model is to pi*: this is how sampled and fine-tuned posteriors are compared.
A proposal that gives probability 0 where the prior does not is refused (``check_support``): its
weights could never see that part of pi*.
"""

from __future__ import annotations

from posterior.priors.base import Prior
from posterior.samplers.common import draw, make_result, tilted_weights
from posterior.samplers.registry import register_sampler


@register_sampler("is")
def importance_sampling(
    post,
    prompts,
    *,
    n: int,
    max_new_tokens: int,
    generator,
    progress: bool = False,
    proposal: Prior | None = None,  # default: the prior itself
):
    d = draw(post, prompts, n, max_new_tokens, generator=generator, proposal=proposal, progress=progress)
    tw = tilted_weights(d, post.beta, prompts, what="importance weights")
    info = {"proposal": "prior" if proposal is None else type(proposal).__name__}
    if proposal is not None:
        info["proposal_support"] = d.support
    return make_result(
        post, "is", prompts, d.cont,
        log_prior=d.log_prior, rewards=d.rewards, log_weights=tw.stats.log_weights, log_Z=tw.log_Z, ess=tw.stats.ess,
        kl=tw.kl, exact_scale=True, info=info,
    )  # fmt: skip
