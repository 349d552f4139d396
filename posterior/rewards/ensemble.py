"""Reward-model ensembles: one conservative reward from several scorers.

For member rewards r_1..r_M of a text x (scores s_m = r_m(x)):

    mean   r(x) = (1/M) sum_m s_m
    wco    r(x) = min_m s_m                                   (worst-case optimisation)
    uwo    r(x) = (1/M) sum_m s_m - lambda * Var_m(s)         (uncertainty-weighted optimisation)

with Var_m(s) = (1/M) sum_m (s_m - mean)^2 the *population* variance over the members (Coste,
Anwar, Kirk & Krueger 2023, "Reward model ensembles help mitigate overoptimization", Eq. for UWO:
intra-ensemble variance; a sample variance 1/(M-1) would only rescale lambda by M/(M-1)).
Optimising the mean of disagreeing scorers, or penalising their disagreement, delays the point
where a policy exploits one scorer's errors.

A text with -inf under any member (a violated hard constraint) has ensemble reward -inf in every
mode; the variance is then never formed (-inf - -inf would be NaN). The ensemble reads prefixes
only when every member does, and reads prompts when any member does. ``members_scores`` returns
the (M, B) member scores, so a caller can report the members' disagreement without the ensemble
keeping state between calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from posterior.rewards.base import Reward, as_reward
from posterior.rewards import ENSEMBLE_MODES

MODES = ENSEMBLE_MODES  # mean | wco | uwo


def combine_scores(scores: torch.Tensor, mode: str, uwo_weight: float | None = None) -> torch.Tensor:
    """The ensemble reward of member scores (M, B) float64 -> (B,) (see the module docstring).

    Columns holding -inf give -inf; finite columns are combined without touching the -inf ones.
    """
    if mode not in MODES:
        raise ValueError(f"ensemble mode must be one of {MODES}, got {mode!r}")
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"member scores must be (M, B) with M >= 1, got shape {tuple(scores.shape)}")
    s = scores.double()
    dead = torch.isneginf(s).any(0)  # (B,) some member says -inf
    safe = torch.where(dead[None, :], torch.zeros_like(s), s)  # (M, B) no -inf left to subtract
    if mode == "mean":
        out = safe.mean(0)
    elif mode == "wco":
        out = safe.amin(0)
    else:
        if uwo_weight is None:
            raise ValueError("mode 'uwo' needs uwo_weight (lambda >= 0)")
        mean = safe.mean(0)  # (B,)
        var = ((safe - mean[None, :]) ** 2).mean(0)  # (B,) population variance over members
        out = mean - uwo_weight * var
    return torch.where(dead, torch.full_like(out, -math.inf), out)


class Ensemble(Reward):
    """mean / worst-case (wco) / uncertainty-weighted (uwo) ensemble of member rewards.

    Parameters
    ----------
    members : sequence of Reward (or plain functions of texts), at least one
    mode : "mean" | "wco" | "uwo"
    uwo_weight : float >= 0, only with mode "uwo": lambda in mean - lambda * population variance
    """

    def __init__(self, members: Sequence, mode: str = "mean", *, uwo_weight: float | None = None):
        if isinstance(members, Reward) or not isinstance(members, Sequence) or isinstance(members, str):
            raise ValueError(f"Ensemble members must be a list of rewards, got {members!r}")
        if not members:
            raise ValueError("Ensemble needs at least one member reward")
        if mode not in MODES:
            raise ValueError(f"Ensemble mode must be one of {MODES}, got {mode!r}")
        if mode == "uwo":
            if isinstance(uwo_weight, bool) or not isinstance(uwo_weight, (int, float)) or not math.isfinite(uwo_weight) or uwo_weight < 0:
                raise ValueError(f"Ensemble mode 'uwo' needs a finite uwo_weight >= 0, got {uwo_weight!r}")
            uwo_weight = float(uwo_weight)
        elif uwo_weight is not None:
            raise ValueError(f"uwo_weight={uwo_weight!r} is only used with mode 'uwo', not {mode!r}")
        self.members = [as_reward(m) for m in members]
        self.mode, self.uwo_weight = mode, uwo_weight
        self.accepts_prefixes = all(m.accepts_prefixes for m in self.members)
        self.needs_prompts = any(m.needs_prompts for m in self.members)
        self.can_be_neg_inf = any(getattr(m, "can_be_neg_inf", False) for m in self.members)

    def for_prompt(self, prompt, index):
        if not self.needs_prompts:
            return self
        return Ensemble([m.for_prompt(prompt, index) for m in self.members], self.mode, uwo_weight=self.uwo_weight)

    def members_scores(self, texts: Sequence[str]) -> torch.Tensor:
        """Validated scores of every member: float64 (M, len(texts))."""
        texts = list(texts)
        return torch.stack([m(texts) for m in self.members]) if texts else torch.zeros(len(self.members), 0, dtype=torch.float64)

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """This ensemble's reward from member scores (M, B) -> (B,)."""
        return combine_scores(scores, self.mode, self.uwo_weight)

    def score(self, texts):
        return self.combine(self.members_scores(texts))

    def __repr__(self):
        mode = f"uwo {self.uwo_weight:g}" if self.mode == "uwo" else self.mode
        return f"Ensemble({mode}: {', '.join(m.name for m in self.members)})"


__all__ = ["MODES", "Ensemble", "combine_scores"]
