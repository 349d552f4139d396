"""What a sampler reports to ``callback=`` after every step (streaming to UIs and logs)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class StepReport(NamedTuple):
    """One step of a sampler, as passed to ``callback(report)``; tensors are the caller's to keep."""

    step: int  # 1, 2, ... steps done
    tokens: int  # tokens per particle decoded so far (SMC), or 0 where steps are not tokens (MH)
    texts: list[list[str]]  # [P][N] the particles' (chains') current texts
    log_weights: torch.Tensor  # (P, N) normalised log-weights (uniform for MCMC chains)
    ess: torch.Tensor  # (P,) importance-sampling ESS of those weights


__all__ = ["StepReport"]
