"""Twists psi_t for twisted SMC (see ``posterior.twists.base``): ``from_reward`` (the reward on
partial texts, ``twist="auto"``), ``Callable`` (a function of texts), and learned twists
(``learned(prior, ...)``, trained by ``pst.train.fit``; ``load(path, prior)``)."""

from posterior.twists.base import Prefixes, TrainableTwist, Twist
from posterior.twists.learned import KINDS, TwistKind, learned, load, register
from posterior.twists.tabular import TabularTwist, optimal_values

__all__ = ["KINDS", "Prefixes", "TabularTwist", "TrainableTwist", "Twist", "TwistKind", "learned", "load", "optimal_values", "register"]
