"""Triton kernels for the samplers' per-step numerics, each with its torch reference (issue 5).

=====================  =================================================  =========================
function               computes                                           reference
=====================  =================================================  =========================
normalize_log_weights  normalised log-weights, ESS, log-mean-exp, flags   ``log_weight_stats``
resample               ancestors for systematic / stratified /            ``RESAMPLERS[scheme]``
                       multinomial resampling
tilted_sample          token ~ q ∝ p exp(phi / beta), log q, log_norm     ``tilted_sample_reference``
                                                                          (CPU: ``tilted_sample_cpu``)
=====================  =================================================  =========================

``backend``: "auto" runs the Triton kernel on CUDA tensors when Triton imports and the torch
reference otherwise (for ``tilted_sample`` on CPU tensors: ``tilted_sample_cpu``, a float64 CDF
inversion ~4x faster than the reference's ``torch.multinomial``, with the same law); "torch" forces
the reference; "triton" forces the kernel (a clear
``ValueError`` if Triton is missing, or for CPU tensors unless ``TRITON_INTERPRET=1`` was set before
this package was imported). Importing this package never needs Triton. See ``kernels/README.md``.
"""

import os as _os
import sys as _sys


def _hand_the_name_over() -> None:
    """This folder imported as a top-level ``kernels`` (Python run from the checkout root has the root
    on ``sys.path``): that name is Hugging Face's ``kernels`` package, which transformers imports.
    Put the installed package in ``sys.modules`` in this module's place, so the checkout never
    shadows it; where none is installed, fail saying what this folder is."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    del _sys.modules["kernels"]
    saved = _sys.path[:]
    _sys.path[:] = [p for p in saved if _os.path.abspath(p or _os.curdir) != root]
    try:
        import importlib

        _sys.modules["kernels"] = importlib.import_module("kernels")
    except ImportError as e:
        raise ImportError(
            f"{_os.path.dirname(_os.path.abspath(__file__))} is posterior.kernels (import it by that name), "
            "and no other package named `kernels` is installed"
        ) from e
    finally:
        _sys.path[:] = saved


if __name__ == "kernels":
    _hand_the_name_over()
else:
    from .dispatch import (  # noqa: F401
        HAS_TRITON,
        KERNEL_SCHEMES,
        TiltedSample,
        WeightStats,
        normalize_log_weights,
        normalize_reference,
        resample,
        resample_reference,
        tilted_log_probs,
        tilted_sample,
        tilted_sample_cpu,
        tilted_sample_reference,
    )

__all__ = [
    "HAS_TRITON",
    "KERNEL_SCHEMES",
    "TiltedSample",
    "WeightStats",
    "normalize_log_weights",
    "normalize_reference",
    "resample",
    "resample_reference",
    "tilted_log_probs",
    "tilted_sample",
    "tilted_sample_cpu",
    "tilted_sample_reference",
]
