"""Sampling methods of pi*, registered by name in ``SAMPLERS`` as ``Method(name, options, info,
run)`` (see ``registry.py``); their options are frozen dataclasses in ``options.py`` (no torch):
``options_for("smc")`` is ``SMCOptions``. The names below are imported on first use;
``SAMPLERS`` then holds every built-in method."""

from posterior.lazy import lazy_names

_getattr, __dir__ = lazy_names(__name__, {
    "SAMPLERS": "posterior.samplers.registry",
    "RESAMPLERS": "posterior.samplers.resampling",
    "Method": "posterior.samplers.registry",
    "get_method": "posterior.samplers.registry",
    "get_sampler": "posterior.samplers.registry",
    "get_resampler": "posterior.samplers.resampling",
    "options_for": "posterior.samplers.registry",
    "per_prompt": "posterior.samplers.drivers",
    "register": "posterior.samplers.registry",
    "register_sampler": "posterior.samplers.registry",
    "register_resampler": "posterior.samplers.resampling",
    "sampler_options": "posterior.samplers.registry",
})  # fmt: skip


def __getattr__(name: str):
    if name == "SAMPLERS":  # the registry with every built-in method in it
        from posterior.samplers.registry import load_builtins

        load_builtins()
    return _getattr(name)


__all__ = [
    "SAMPLERS", "RESAMPLERS", "Method", "get_method", "get_sampler", "get_resampler", "options_for", "per_prompt",
    "register", "register_sampler", "register_resampler", "sampler_options",
]  # fmt: skip
