"""The registry of learned-twist kinds: ``register(TwistKind(name, applies, build, load))``.

A kind's own module registers it at import (``posterior.twists.head``); ``posterior.twists.learned``
registers the tabular kind and imports every kind's module, so the registry is full wherever
``learned`` / ``load`` can be called. Kept apart from both so that a kind's module imports only this
registry, never the module that imports it (no import circle).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # annotations only
    from posterior.priors.base import Prior
    from posterior.twists.base import TrainableTwist


class TwistKind(NamedTuple):
    """A kind of learned twist."""

    name: str
    applies: Callable[[Prior, int | None, Sequence[str] | None], bool]  # (prior, max_new_tokens, prompts) -> usable
    build: Callable[..., TrainableTwist]  # build(prior, *, max_new_tokens, prompts, **options)
    load: Callable[[Path, Prior, dict], TrainableTwist]  # load(folder, prior, config from twist.json)
    requires: str = ""  # what ``applies`` checks, for the error when no kind applies


KINDS: dict[str, TwistKind] = {}


def register(kind: TwistKind) -> None:
    """Add (or replace) a kind of learned twist; later registrations are tried after earlier ones."""
    KINDS[kind.name] = kind


__all__ = ["KINDS", "TwistKind", "register"]
