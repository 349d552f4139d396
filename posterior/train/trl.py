"""A bridge to TRL: train pi* with TRL's trainers, using the posterior's reward and beta.

KL-regularised RL maximises E_q[r] - beta KL(q || pi_ref); with pi_ref = pi0 its optimum is
pi* ∝ pi0 exp(r/beta) (Korbak, Perez & Buckley 2022). TRL's RLOO / GRPO trainers optimise that
objective with a reward function ``fn(prompts, completions, **kw) -> list[float]`` and a KL
coefficient ``beta``, so ``trl_reward(post)`` returns both: train with the prior's model as the
reference and the trained model approximates ``post``'s pi*.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _completion_text(c) -> str:
    """A TRL completion: a string (standard format) or a list of messages (conversational)."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(m, dict) and "content" in m for m in c):
        return "".join(str(m["content"]) for m in c if m.get("role", "assistant") == "assistant")
    raise ValueError(f"a completion must be a string or a list of chat messages, got {type(c).__name__}: {c!r:.80}")


def trl_reward(post) -> tuple[Callable[..., list[float]], float]:
    """A TRL reward function for ``post.reward`` and the matching KL coefficient ``post.beta``.

    Returns
    -------
    (fn, beta)
        ``fn(prompts=..., completions=..., **kw) -> list[float]``: r of each completion text
        (other keyword columns are ignored, as TRL passes dataset columns). A reward of -inf (a
        hard constraint) raises ValueError: a policy-gradient trainer cannot use it; train with
        ``pst.train.fit(objective="forward_kl")`` instead. Pass ``beta`` as the trainer's
        ``beta`` (e.g. ``trl.RLOOConfig(beta=beta)``).
    """
    from posterior.posterior import Posterior

    if not isinstance(post, Posterior):
        raise ValueError(f"trl_reward needs a posterior.Posterior, got {type(post).__name__}")
    reward = post.reward

    def reward_fn(prompts=None, completions=None, **kwargs) -> list[float]:
        if completions is None:
            raise ValueError("the TRL reward function needs completions=")
        texts = [_completion_text(c) for c in completions]
        r = reward(texts).tolist()
        for t, v in zip(texts, r):
            if not math.isfinite(v):
                raise ValueError(
                    f"reward {reward.name} is {v} for completion {t!r:.80}: a hard constraint, which a "
                    "policy-gradient trainer cannot use; use pst.train.fit(objective='forward_kl')"
                )
        return r

    reward_fn.__name__ = f"posterior_{type(reward).__name__.lower()}"
    return reward_fn, post.beta


__all__ = ["trl_reward"]
