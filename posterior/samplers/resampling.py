"""Resampling schemes, registered by name (``RESAMPLERS``). The pure functions live with their
kernels in :mod:`posterior.kernels.schemes` (the torch references of ``posterior.kernels.resample``);
this module is their home in the samplers' namespace."""

from posterior.kernels.schemes import (  # noqa: F401
    RESAMPLERS,
    Resampler,
    _stratified_points,
    _uniform,
    get_resampler,
    offspring_counts,
    register_resampler,
)

__all__ = ["RESAMPLERS", "Resampler", "get_resampler", "offspring_counts", "register_resampler"]
