"""Twists given by functions of texts: a reward read on partial texts, or any function of texts.

    pst.twists.from_reward(r)     psi_t(x_1:t) = r(text of x_1:t)   (``twist="auto"`` when
                                  ``r.accepts_prefixes``: Sentiment, Callable(..., accepts_prefixes=True))
    pst.twists.Callable(fn)       psi_t(x_1:t) = fn([text of x_1:t, ...])[b]   (-inf allowed)

Both are non-dense (``values`` only): the tilted proposal scores the ``lookahead`` most likely next
tokens of each particle with one batched call of texts. Any finite values leave SMC's final
target exactly pi* (see ``posterior.twists.base``); -inf is allowed only on prefixes none of whose
completions has a finite reward, and SMC checks that where a particle dies of it (it rolls one
completion of the dead prefix out of the prior and raises if its reward is finite).

A new twist of texts is a subclass of :class:`~posterior.twists.base.Twist` with ``values``
reading ``x.texts``: see :class:`Callable` below, which is the whole pattern.
"""

from __future__ import annotations

from collections.abc import Callable as _Fn

import torch

from posterior.rewards.base import Reward
from posterior.twists.base import Prefixes, Twist


class _OfTexts(Twist):
    """A twist whose value is a function of each prefix's text (validated like a reward)."""

    def __init__(self, score: Reward, name: str):
        self.score = score  # a validated function of texts: finite or -inf, no NaN / +inf
        self.name = name

    def values(self, x: Prefixes) -> torch.Tensor:
        return self.score(x.texts)  # (B,) float64

    def values_of_texts(self, texts: list[str]) -> torch.Tensor:
        """psi of given prefix texts (what the engine calls when it already has the texts)."""
        return self.score(texts)


class FromReward(_OfTexts):
    """psi_t = r(prefix text): the reward itself read on partial texts (``twist="auto"``)."""

    def __init__(self, reward: Reward):
        if not isinstance(reward, Reward):
            raise ValueError(f"from_reward needs a posterior Reward, got {reward!r}")
        super().__init__(reward, reward.name)
        self.reward = reward  # the engine scores running and ended particles in one call when it is the posterior's


class Callable(_OfTexts):
    """psi_t = fn(texts) for a user function ``fn(list[str]) -> list[float]`` (-inf allowed where no
    completion of the prefix can have a finite reward, e.g. a prefix check of a hard constraint)."""

    def __init__(self, fn: _Fn[[list[str]], object], *, name: str | None = None):
        if not callable(fn):
            raise ValueError(f"twists.Callable needs a function of texts, got {fn!r}")
        from posterior.rewards.base import Callable as CallableReward

        label = name or getattr(fn, "__name__", "twist")
        super().__init__(CallableReward(fn, name=label, accepts_prefixes=True), label)
        self.fn = fn


def from_reward(reward: Reward) -> FromReward:
    """The twist psi_t = r(prefix text) (meaningful when ``reward.accepts_prefixes``)."""
    return FromReward(reward)


__all__ = ["Callable", "FromReward", "from_reward"]
