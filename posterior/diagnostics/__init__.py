"""Diagnostics computed on every result: normalised weights, ESS, log Z, KL, reward statistics."""

from posterior.diagnostics.weights import (
    WeightStats,
    check_log_weights,
    log_weight_stats,
    normalize,
)

__all__ = ["WeightStats", "check_log_weights", "log_weight_stats", "normalize"]
