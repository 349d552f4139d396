"""Twists psi_t for twisted SMC (see ``posterior.twists.base``): ``from_reward`` (the reward on
partial texts, ``twist="auto"``), ``Callable`` (a function of texts), and learned twists
(``learned(prior, ...)``, trained by ``pst.train.fit``; ``load(path, prior)``): a head over an HF
prior's hidden states (``head``), a table for small ``CallablePrior``s (``tabular``).

Adding a twist: one file here with a :class:`Twist` subclass (``values`` of prefixes and/or dense
``next_values``), exported below; ``post.sample(method="smc", twist=obj)`` takes it as it is.
A learned kind also registers itself with :func:`register` (see ``posterior.twists.learned``).
"""

from posterior.twists.base import Prefixes, TrainableTwist, Twist
from posterior.twists.learned import KINDS, TwistKind, learned, load, register
from posterior.twists.reward import Callable, FromReward, from_reward
from posterior.twists.tabular import TabularTwist, optimal_values
from posterior.twists.head import HeadTwist  # registers the "head" kind

__all__ = [
    "KINDS", "Callable", "FromReward", "HeadTwist", "Prefixes", "TabularTwist", "TrainableTwist", "Twist", "TwistKind",
    "from_reward", "learned", "load", "optimal_values", "register",
]  # fmt: skip
