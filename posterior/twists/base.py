"""Twists: the intermediate potentials psi_t of twisted SMC, as objects.

Twisted SMC (Naesseth, Lindsten & Schön 2019; Zhao, Brekelmans, Makhzani & Grosse 2024,
"Probabilistic inference in language models via twisted SMC") targets, after t tokens,

    gamma_t(x_1:t) = pi0(x_1:t) · exp(psi_t(x_1:t) / beta),        psi_0 = 0,

and, once a particle has ended (EOS or max_new_tokens), gamma(x) = pi0(x) · exp(r(x)/beta): the
final target is exactly the unnormalised pi* whatever the twist, so any twist that is finite
wherever some completion has a finite reward leaves the result exact (log Ẑ unbiased). The twist
only decides how good the intermediate targets are. The optimal twist is

    psi*_t(x_1:t) = beta · log E_pi0[ exp(r(X)/beta) | x_1:t ],

with which the locally optimal (tilted) proposal gives every particle the same weight Z.

Who owns what ("the model supplies, the algorithm owns"): the SMC engine owns particles, weights,
ancestry and the psi of each particle's current prefix; a twist is a function of prefixes that
keeps no per-particle state. A twist gives one of, or both:

* ``values(x)`` -> (B,) float64: psi of each row's prefix x_1:t (t = ``x.lengths[b]`` >= 1);
* ``next_values(x)`` -> (B, V) float64 (``dense = True``): psi(x_1:t · v) for every next token v,
  in one call — what makes the tilted proposal one forward pass instead of ``lookahead`` reward
  calls. The engine then reads psi of the sampled token from the row it already has.

The value of a twist on an *ended* sequence is never used (the engine uses the reward there), so
a dense twist's value at EOS may be anything finite.

Writing a twist: subclass :class:`Twist`, set ``name``, implement ``values`` (texts are in
``x.texts``) and/or ``next_values`` with ``dense = True``; set ``needs_hidden = True`` to get the
prior's last hidden states in ``x.hidden`` (priors with the ``HIDDEN_STATES`` capability). A
trainable twist also subclasses :class:`TrainableTwist`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch


@dataclass(frozen=True)
class Prefixes:
    """B particles' prefixes, everything a twist may read. The engine builds it; the twist must
    not keep it beyond the call."""

    prompt_ids: Sequence[Sequence[int]]  # B rows: each row's prompt token ids (the prior's encoding)
    tokens: torch.Tensor  # (B, t) int64 continuation tokens; row b is valid up to lengths[b]
    lengths: torch.Tensor  # (B,) int64
    prompt_index: torch.Tensor  # (B,) int64: which prompt of the run (0..P-1) each row continues
    decode: Callable[[list[int]], str] = field(repr=False)  # the prior's token ids -> text
    eos_token_ids: tuple[int, ...] = ()
    hidden: torch.Tensor | None = field(default=None, repr=False)  # (B, H) after the last token, if asked

    @cached_property
    def texts(self) -> list[str]:
        """Each row's continuation text (EOS excluded), decoded once on first use."""
        eos = set(self.eos_token_ids)
        return [self.decode([v for v in row[:L] if v not in eos]) for row, L in zip(self.tokens.tolist(), self.lengths.tolist())]

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


class Twist(abc.ABC):
    """psi_t over particles' prefixes (see the module docstring)."""

    name: str = "twist"
    dense: bool = False  # implements next_values: (B, V) psi of every one-token extension
    needs_hidden: bool = False  # reads x.hidden (the prior must have the HIDDEN_STATES capability)

    def values(self, x: Prefixes) -> torch.Tensor:
        """(B,) float64 psi of each prefix; -inf only where no completion has a finite reward.

        Dense twists get this for free: psi(x_1:t) is row x_t of the next values at x_1:t-1, so the
        engine reads it from the previous step and calls this only where it has no such row (on
        priors without next-token distributions, where blocks come from ``continue_prefixes``)."""
        raise NotImplementedError(f"twist {self.name!r} gives no values of prefixes")

    def next_values(self, x: Prefixes) -> torch.Tensor:
        """(B, V) float64 psi(x_1:t · v) for every token v (dense twists).

        Called with t = ``x.lengths[b]`` >= 0 (t = 0: the prompt alone), once per step where the
        engine reweights (every ``block_size`` tokens), over the running particles; with
        ``needs_hidden``, ``x.hidden`` is the state after x_t (the one that predicts x_t+1). Values
        at tokens with pi0 = 0 are unused; at an ending token (EOS, or any token at the last step)
        they only shape the tilted proposal (the weight uses the reward there)."""
        raise NotImplementedError(f"twist {self.name!r} is not dense (no next-token values)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class TrainableTwist(Twist):
    """A twist with parameters, trained by ``pst.train.fit(post, twist, objective=...)``.

    ``prefix_values`` gives psi at every prefix of given continuations in one (teacher-forced)
    pass, with gradients when asked, which is what the twist objectives need.
    """

    @abc.abstractmethod
    def prefix_values(self, prompt_ids: Sequence[Sequence[int]], tokens: torch.Tensor, lengths: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """psi(x_1:t) for t = 1..T of continuations tokens (P, N, T), lengths (P, N) -> (P, N, T)
        float (0 at t > lengths; the value at the last position of an ended sequence is unused)."""

    @abc.abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    @abc.abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> Path:
        """Write the twist to a folder; ``pst.twists.load(path, prior)`` reads it back."""


__all__ = ["Prefixes", "TrainableTwist", "Twist"]
