"""Samplers of pi*, registered by name in ``SAMPLERS`` (see ``registry.py``); their options as data
in ``options.py``. The names below are imported on first use (``posterior.samplers.options`` needs
no torch); ``SAMPLERS`` then holds every built-in sampler."""

from posterior.lazy import lazy_names

_getattr, __dir__ = lazy_names(__name__, {
    "SAMPLERS": "posterior.samplers.registry",
    "RESAMPLERS": "posterior.samplers.resampling",
    "get_sampler": "posterior.samplers.registry",
    "get_resampler": "posterior.samplers.resampling",
    "register_sampler": "posterior.samplers.registry",
    "register_resampler": "posterior.samplers.resampling",
    "sampler_options": "posterior.samplers.registry",
})  # fmt: skip


def __getattr__(name: str):
    if name == "SAMPLERS":  # the registry with every built-in sampler in it
        from posterior.samplers.registry import load_builtins

        load_builtins()
    return _getattr(name)


__all__ = ["SAMPLERS", "RESAMPLERS", "get_sampler", "get_resampler", "register_sampler", "register_resampler", "sampler_options"]
