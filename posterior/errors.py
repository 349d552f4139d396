"""Errors raised for bad input, and the checks at the boundary that raise them.

Every error is a ``ValueError`` (or subclass) that names the bad value. The checks accept what
Python code passes for a number in practice: Python ints and floats, numpy scalars (``np.int64``,
``np.float32``, ...) and one-element torch tensors of an integer / floating dtype; ``bool`` is
never a number here (``n=True`` is a mistake, not 1).
"""

from __future__ import annotations

import math
import numbers


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


def _unwrap(value):
    """A one-element torch tensor as its Python scalar; anything else unchanged."""
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        if value.dtype == torch.bool:
            return bool(value.item())
        return value.item()
    return value


def is_int(value) -> bool:
    """An integer that is not a bool (numpy and one-element torch integers included)."""
    value = _unwrap(value)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_real(value) -> bool:
    """A real number that is not a bool (numpy and one-element torch numbers included)."""
    value = _unwrap(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as a Python int, or ``ValueError`` naming ``name`` and the value."""
    what = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
    if not is_int(value) or (minimum is not None and int(_unwrap(value)) < minimum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(_unwrap(value))


def check_real(name: str, value, *, positive: bool = False, finite: bool = True) -> float:
    """``value`` as a Python float, or ``ValueError`` naming ``name`` and the value."""
    ok = is_real(value)
    out = float(_unwrap(value)) if ok else math.nan
    if not ok or math.isnan(out) or (finite and not math.isfinite(out)) or (positive and out <= 0):
        kind = "a finite number" if finite else "a number"
        raise ValueError(f"{name} must be {kind}{' > 0' if positive else ''}, got {value!r}")
    return out


def as_plain(value):
    """numpy / one-element torch scalars as Python int, float or bool; other values unchanged
    (so method options given as ``np.int64(8)`` reach every sampler as ``8``)."""
    v = _unwrap(value)
    if type(v).__name__ == "bool_":
        return bool(v)
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Integral) and not isinstance(v, int):
        return int(v)
    if isinstance(v, numbers.Real) and not isinstance(v, float) and not isinstance(v, int):
        return float(v)
    if v is not value and isinstance(v, (int, float)):  # a torch scalar unwrapped
        return v
    return value


def check_device(device):
    """``device`` as a ``torch.device`` that exists here, or ``ValueError`` naming it."""
    import torch

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({e})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not available: torch.cuda.is_available() is False")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not available on this machine")
    return dev


def check_hf_model(model, tokenizer) -> None:
    """``HFPrior(model, tokenizer)`` takes a loaded causal LM and its tokenizer, in that order."""
    import torch

    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config") and callable(getattr(model, "generate", None))):
        raise ValueError(
            "model must be a loaded transformers causal LM (e.g. AutoModelForCausalLM.from_pretrained(path)), "
            f"got {type(model).__name__}: {str(model)[:80]!r}; to load from a folder use HFPrior.from_pretrained(path)"
        )
    if not (callable(getattr(tokenizer, "decode", None)) and callable(getattr(tokenizer, "get_vocab", None))):
        raise ValueError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}: {str(tokenizer)[:80]!r}")


__all__ = ["CheckpointError", "DegenerateWeightsError", "as_plain", "check_device", "check_hf_model", "check_int", "check_real", "is_int", "is_real"]
