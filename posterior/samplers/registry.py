"""Samplers registered by name, so ``Posterior.sample(method="smc")`` is a lookup.

A sampler is ``fn(posterior, prompts, *, n, max_new_tokens, generator, progress, **options)``
returning a :class:`~posterior.results.SampleResult`; its options are explicit keyword-only
parameters with defaults, which ``Posterior.sample`` checks by name. The built-in samplers
(``BUILTIN_MODULES``, which need torch) register themselves when :func:`load_builtins` first
imports them: on the first :func:`get_sampler`, or the first ``posterior.samplers.SAMPLERS``.
Their options as data, without torch, are in :mod:`posterior.samplers.options`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

SAMPLERS: dict[str, Callable] = {}
COMMON = ("n", "max_new_tokens", "generator", "progress")
BUILTIN_MODULES = ("best_of_n", "importance", "rejection", "smc", "mh", "pgibbs")  # posterior.samplers.<module>
_builtins_loaded = False


def register_sampler(name: str):
    def deco(fn):
        params = inspect.signature(fn).parameters
        missing = [p for p in COMMON if p not in params]
        if missing:
            raise TypeError(f"sampler {name!r} must accept {missing}")
        SAMPLERS[name] = fn
        return fn

    return deco


def load_builtins() -> None:
    """Import the built-in samplers (each registers itself), once."""
    global _builtins_loaded
    if not _builtins_loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(f"posterior.samplers.{module}")
        _builtins_loaded = True


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        load_builtins()
    if name not in SAMPLERS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_options(name: str) -> dict[str, object]:
    """The method-specific options of a sampler with their defaults: its signature's, or for a
    built-in not imported yet, the table's (``posterior.samplers.options``: the same, without torch)."""
    from posterior.samplers.options import METHOD_OPTIONS

    if name not in SAMPLERS and name in METHOD_OPTIONS:
        return {k: option.default for k, option in METHOD_OPTIONS[name].items()}
    params = inspect.signature(get_sampler(name)).parameters
    return {k: p.default for k, p in list(params.items())[2:] if k not in COMMON}
