"""Diagnostics computed on every result: normalised weights, ESS, log Z, KL, reward statistics."""

from posterior.diagnostics.qrs import qrs_estimates
from posterior.diagnostics.tilt import (
    RESOLUTION_LIMIT,
    check_resolution,
    kl_estimate,
    relative_log_weights,
    reward_shift,
    scaled,
)
from posterior.diagnostics.weights import (
    WeightStats,
    check_log_weights,
    log_weight_stats,
    normalize,
    weighted_mean,
)

__all__ = [
    "RESOLUTION_LIMIT",
    "WeightStats",
    "check_log_weights",
    "check_resolution",
    "kl_estimate",
    "log_weight_stats",
    "normalize",
    "qrs_estimates",
    "relative_log_weights",
    "reward_shift",
    "scaled",
    "weighted_mean",
]
