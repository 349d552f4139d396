"""Twists psi_t for twisted SMC (see ``posterior.twists.base``): ``from_reward`` (the reward on
partial texts, ``twist="auto"``), ``Callable`` (a function of texts), and learned twists
(``learned(prior, ...)``, trained by ``pst.train.fit``; ``load(path, prior)``): a head over an HF
prior's hidden states (``head``), a table for small ``CallablePrior``s (``tabular``).

Adding a twist: one file here with a :class:`Twist` subclass (``values`` of prefixes and/or dense
``next_values``), named in the table below; ``post.sample(method="smc", twist=obj)`` takes it as it is.
A learned kind also registers itself with :func:`register` (see ``posterior.twists.learned``).
The names are imported on first use.
"""

from posterior.lazy import lazy_names

CONFIG_FILE = "twist.json"  # every saved twist's folder holds it (``load`` reads its "kind"); no torch needed to look

__getattr__, __dir__ = lazy_names(__name__, {
    **dict.fromkeys(["Prefixes", "TrainableTwist", "Twist"], "posterior.twists.base"),
    **dict.fromkeys(["KINDS", "TwistKind", "learned", "load", "register"], "posterior.twists.learned"),
    **dict.fromkeys(["Callable", "FromReward", "from_reward"], "posterior.twists.reward"),
    **dict.fromkeys(["TabularTwist", "optimal_values"], "posterior.twists.tabular"),
    "HeadTwist": "posterior.twists.head",
})  # fmt: skip

__all__ = [
    "KINDS", "Callable", "FromReward", "HeadTwist", "Prefixes", "TabularTwist", "TrainableTwist", "Twist", "TwistKind",
    "from_reward", "learned", "load", "optimal_values", "register",
]  # fmt: skip
