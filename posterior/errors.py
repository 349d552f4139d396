"""Errors raised for bad input. Every one is a ``ValueError`` that names the bad value."""


class DegenerateWeightsError(ValueError):
    """Every particle of some prompt has log-weight -inf (or the weights are otherwise unusable).

    Raised instead of letting NaN travel: a posterior with no finite-weight sample cannot be
    estimated from these draws. ``rows`` lists the offending prompt indices.
    """

    def __init__(self, message: str, rows: list[int] | None = None):
        super().__init__(message)
        self.rows = list(rows or [])
