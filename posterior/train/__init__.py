"""Amortised approximators of pi*(x) ∝ pi0(x) exp(r(x)/beta): trainable policies and one loop.

    policy = pst.train.policy_from(prior, lora_rank=8)          # q = pi0 at the start
    run = pst.train.fit(post, policy, objective="dpg", steps=200, batch_size=8, lr=1e-3,
                        max_new_tokens=16, checkpoint_dir="runs/dpg")
    # the same settings as one object (posterior.train.config: defaults, checks and help once):
    run = pst.train.fit(post, policy, pst.train.FitConfig(objective="dpg", steps=200, max_new_tokens=16))
    post.sample(method="is", proposal=policy)                   # how close q is to pi*

Objectives (:mod:`posterior.train.objectives`): "reverse_kl" / "rl" (KL-regularised RL, RLOO),
"forward_kl" / "dpg" (DPG), "js" and "tv" (f-DPG), "distill" (max. likelihood on SMC samples of pi*),
"reward" (no KL: collapses). ``trl_reward(post)`` gives TRL trainers the same target.
"""

from posterior.lazy import lazy_names

__getattr__, __dir__ = lazy_names(__name__, {
    "FitConfig": "posterior.train.config",  # no torch
    "TrainRun": "posterior.train.loop",
    "fit": "posterior.train.loop",
    **dict.fromkeys(["ALIASES", "OBJECTIVES", "get_objective"], "posterior.train.objectives"),
    **dict.fromkeys(["HFPolicy", "Policy", "TabularPolicy", "load_policy", "policy_from"], "posterior.train.policy"),
    "trl_reward": "posterior.train.trl",
})  # fmt: skip (the objectives' names without torch: posterior.train.objective_names)

__all__ = [
    "ALIASES",
    "OBJECTIVES",
    "FitConfig",
    "HFPolicy",
    "Policy",
    "TabularPolicy",
    "TrainRun",
    "fit",
    "get_objective",
    "load_policy",
    "policy_from",
    "trl_reward",
]
