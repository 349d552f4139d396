"""Rewards that read prompts (TRL reward functions) are scored one prompt at a time: the driver
that runs a method once per prompt, ``per_prompt``, and ``stack_results`` now live in
:mod:`posterior.samplers.drivers`. These names are kept here as aliases for code that imported
them from this module (resolved on first use, so importing this module imports no sampler)."""

from __future__ import annotations

_MOVED = ("per_prompt", "stack_results", "_stack_info", "_pad_last")


def __getattr__(name: str):
    if name in _MOVED:
        from posterior.samplers import drivers

        return getattr(drivers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["per_prompt", "stack_results"]
