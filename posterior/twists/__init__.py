"""Twists psi_t for twisted SMC (see ``posterior.twists.base``): ``from_reward`` (the reward on
partial texts, ``twist="auto"``), ``Callable`` (a function of texts), and learned twists.

Adding a twist: one file here with a :class:`Twist` subclass (``values`` of prefixes and/or dense
``next_values``), exported below; ``post.sample(method="smc", twist=obj)`` takes it as it is.
"""

from posterior.twists.base import Prefixes, TrainableTwist, Twist
from posterior.twists.reward import Callable, FromReward, from_reward

__all__ = ["Callable", "FromReward", "Prefixes", "TrainableTwist", "Twist", "from_reward"]
