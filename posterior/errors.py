"""The package's own error classes.

Every error is a ``ValueError`` (or subclass) that names the bad value. The checks that raise
them (numbers, probabilities, seeds, prompts, devices, models, loaded tensors) live in
:mod:`posterior.validate` alone.
"""

from __future__ import annotations


class DegenerateWeightsError(ValueError):
    """Every particle of some prompt has log-weight -inf (or the weights are otherwise unusable).

    Raised instead of letting NaN travel: a posterior with no finite-weight sample cannot be
    estimated from these draws. ``rows`` lists the offending prompt indices.
    """

    def __init__(self, message: str, rows: list[int] | None = None):
        super().__init__(message)
        self.rows = list(rows or [])


class CheckpointError(ValueError):
    """Saved training state that cannot be used: a missing, empty, truncated, garbage or foreign
    checkpoint or policy file, or a path of the wrong kind. The message is one line naming the
    path and what is wrong (the CLI prints it and exits 2); ``path`` is that path."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path


def first_line(e: Exception) -> str:
    """An exception's first line (at most 160 characters): a one-line error a user can read."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


__all__ = ["CheckpointError", "DegenerateWeightsError", "first_line"]
