"""Samplers registered by name, so ``Posterior.sample(method="smc")`` is a lookup.

A sampler is ``fn(posterior, prompts, *, n, max_new_tokens, generator, progress, **options)``
returning a :class:`~posterior.results.SampleResult`; its options are explicit keyword-only
parameters with defaults, which ``Posterior.sample`` checks by name.
"""

from __future__ import annotations

import inspect
from typing import Callable

SAMPLERS: dict[str, Callable] = {}
COMMON = ("n", "max_new_tokens", "generator", "progress")


def register_sampler(name: str):
    def deco(fn):
        params = inspect.signature(fn).parameters
        missing = [p for p in COMMON if p not in params]
        if missing:
            raise TypeError(f"sampler {name!r} must accept {missing}")
        SAMPLERS[name] = fn
        return fn

    return deco


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_options(name: str) -> dict[str, object]:
    """The method-specific options of a sampler with their defaults."""
    params = inspect.signature(get_sampler(name)).parameters
    return {k: p.default for k, p in list(params.items())[2:] if k not in COMMON}
