"""The training objectives by name, without torch: ``posterior train --objective`` is checked
before torch loads. The losses, and the tables that pair each name with its loss
(``OBJECTIVES``, ``TWIST_OBJECTIVES``), are built from these names in
:mod:`posterior.train.objectives` (policies) and :mod:`posterior.train.twist_objectives` (twists).
"""

from __future__ import annotations

from typing import NamedTuple


class ObjectiveKind(NamedTuple):
    on_policy: bool  # samples from q (True) or from the posterior (distill)
    uses_log_Z: bool  # takes the loop's running log Z estimate


POLICY_OBJECTIVES: dict[str, ObjectiveKind] = {
    "reverse_kl": ObjectiveKind(on_policy=True, uses_log_Z=False),
    "forward_kl": ObjectiveKind(on_policy=True, uses_log_Z=False),
    "js": ObjectiveKind(on_policy=True, uses_log_Z=True),
    "tv": ObjectiveKind(on_policy=True, uses_log_Z=True),
    "reward": ObjectiveKind(on_policy=True, uses_log_Z=False),
    "distill": ObjectiveKind(on_policy=False, uses_log_Z=False),
}
ALIASES = {"rl": "reverse_kl", "dpg": "forward_kl"}
TWIST_OBJECTIVES = ("ctl", "regression", "fudge")


def policy_objective(name: str) -> str:
    """The policy objective ``name`` (or alias) stands for, or ``ValueError`` listing them."""
    key = ALIASES.get(name, name)
    if key not in POLICY_OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(POLICY_OBJECTIVES) + sorted(ALIASES)}")
    return key


__all__ = ["ALIASES", "POLICY_OBJECTIVES", "TWIST_OBJECTIVES", "ObjectiveKind", "policy_objective"]
