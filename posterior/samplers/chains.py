"""The one chains loop of the MCMC methods (Metropolis–Hastings, particle Gibbs): steps, burn-in,
thinning and the trace diagnostics, written once.

A method supplies its initial state and ``step(state, s) -> (state, info)``; the loop runs
``options.steps`` steps, records each step's rewards (P, N), keeps the states after burn-in
(every ``thin``-th counted back from the last: ``ChainOptions.kept``) and computes, on the kept
reward traces, the split R-hat and the autocorrelation ESS (``mcmc_ess``, the MCMC ESS, not the
importance-sampling ESS) across chains (Gelman & Rubin 1992; Geyer 1992; via ``pyro.ops.stats``).
Where too few states were kept for a diagnostic, :class:`ChainsInfo` says why in ``r_hat_note`` /
``mcmc_ess_note``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from posterior.diagnostics.mcmc import finite_mean, reward_trace_diagnostics, too_short
from posterior.results import Info
from posterior.samplers.options import ChainOptions


@dataclass(frozen=True, eq=False)
class ChainsInfo(Info):
    """What every MCMC method reports (its info class adds its own fields)."""

    steps: int | None = None  # steps (sweeps) per chain
    burn_in: int | None = None  # steps discarded before the kept trace
    thin: int | None = None  # every thin-th state kept after burn-in
    r_hat: Any = None  # (P,) float64 split R-hat of the kept reward traces; None (with r_hat_note) if too few kept
    mcmc_ess: Any = None  # (P,) float64 autocorrelation ESS of the kept reward traces (not the IS ess)
    reward_trace: Any = None  # (P, K) mean finite reward over the chains after each step
    r_hat_note: str | None = None  # why r_hat is undefined for this run
    mcmc_ess_note: str | None = None

    always_keys = ("r_hat", "mcmc_ess")


class ChainsRun(NamedTuple):
    state: Any  # the chains' last state
    infos: list  # each step's info
    kept: list  # the kept states (with ``keep=``), in step order
    trace: torch.Tensor  # (P, N, K) rewards after each step (K = steps, + 1 with initial rewards)
    r_hat: torch.Tensor  # (P,) float64 (NaN where undefined)
    mcmc_ess: torch.Tensor  # (P,) float64
    notes: dict  # {"r_hat" | "mcmc_ess": why it is undefined for every prompt}: too few kept states

    def info_fields(self, options: ChainOptions) -> dict:
        """The :class:`ChainsInfo` fields of this run. A diagnostic that too few kept states leave
        undefined for every prompt is None, with its note (MH and particle Gibbs alike)."""
        out = {"steps": options.steps, "burn_in": options.burn_in_steps, "thin": options.thin,
               "r_hat": self.r_hat, "mcmc_ess": self.mcmc_ess, "reward_trace": finite_mean(self.trace, 1)}  # fmt: skip
        for key, why in self.notes.items():
            out[key] = None
            out[f"{key}_note"] = why
        return out


def run_chains(
    state,
    step: Callable[[Any, int], tuple[Any, Any]],
    options: ChainOptions,
    *,
    rewards: Callable[[Any], torch.Tensor],
    initial_rewards: torch.Tensor | None = None,
    keep: Callable[[Any], Any] | None = None,
    on_step: Callable[[int, Any], None] | None = None,
    progress: bool = False,
    desc: str = "chains",
) -> ChainsRun:
    """Run ``options.steps`` steps of the chains from ``state``.

    Parameters
    ----------
    state
        The initial state (the method's; the loop only passes it to ``step``).
    step : fn(state, s) -> (state, info)
        Step s = 1, 2, ... of every chain; the state passed in is the step's to consume.
    rewards : fn(state) -> Tensor (P, N)
        The chains' rewards in a state.
    initial_rewards : Tensor (P, N), optional
        The initial state's rewards, the trace's first column (MH); None where the initial state
        has none (particle Gibbs' first sweep starts from nothing).
    keep : fn(state) -> kept state, optional
        Record the kept states (after burn-in and thinning) as ``keep(state)``.
    on_step : fn(s, state), optional
        Called after every step (callbacks, histories).
    """
    kept = set(options.kept)
    trace = [] if initial_rewards is None else [initial_rewards]
    kept_rewards, kept_states, infos = [], [], []
    for s in tqdm(range(1, options.steps + 1), desc=desc, unit="step", disable=not progress, leave=False):
        state, info = step(state, s)
        infos.append(info)
        r = rewards(state)  # (P, N)
        trace.append(r)
        if s in kept:
            kept_rewards.append(r)
            if keep is not None:
                kept_states.append(keep(state))
        if on_step is not None:
            on_step(s, state)
    r_hat, mcmc_ess = reward_trace_diagnostics(torch.stack(kept_rewards, -1))  # (P, N, K kept)
    notes = too_short(len(kept), steps=options.steps, burn_in=options.burn_in_steps, thin=options.thin)
    return ChainsRun(state, infos, kept_states, torch.stack(trace, -1), r_hat, mcmc_ess, notes)


__all__ = ["ChainsInfo", "ChainsRun", "run_chains"]
