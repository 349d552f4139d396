"""Samplers of pi*, registered by name in ``SAMPLERS`` (see ``registry.py``)."""

from posterior.samplers import best_of_n, importance, rejection  # noqa: F401  (register)
from posterior.samplers import smc  # noqa: F401
from posterior.samplers import mh  # noqa: F401
from posterior.samplers import pgibbs  # noqa: F401
from posterior.samplers.registry import SAMPLERS, get_sampler, register_sampler, sampler_options
from posterior.samplers.resampling import RESAMPLERS, get_resampler, register_resampler

__all__ = ["SAMPLERS", "RESAMPLERS", "get_sampler", "get_resampler", "register_sampler", "register_resampler", "sampler_options"]
