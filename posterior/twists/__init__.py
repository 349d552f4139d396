"""Twists psi_t for twisted SMC (see ``posterior.twists.base``): ``from_reward`` (the reward on
partial texts, ``twist="auto"``), ``Callable`` (a function of texts), and learned twists."""

from posterior.twists.base import Prefixes, TrainableTwist, Twist

__all__ = ["Prefixes", "TrainableTwist", "Twist"]
