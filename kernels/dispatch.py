"""The dispatchers: the Triton kernel on CUDA tensors, the torch reference elsewhere (see ``__init__``)."""

from __future__ import annotations

import torch

from posterior.diagnostics.weights import WeightStats
from .schemes import RESAMPLERS

from ._common import HAS_TRITON, check_float, is_row_streams, resolve_backend
from .normalize import normalize_reference, normalize_triton
from .resample import KERNEL_SCHEMES, resample_reference, resample_triton
from .tilted import (
    TiltedSample,
    check_tilted_inputs,
    tilted_log_probs,
    tilted_sample_cpu,
    tilted_sample_reference,
    tilted_sample_triton,
)


def normalize_log_weights(log_weights: torch.Tensor, *, backend: str = "auto") -> WeightStats:
    """Normalised log-weights, importance-sampling ESS and log-mean-exp along the last axis.

    Parameters
    ----------
    log_weights : Tensor (..., N)
        Unnormalised log-weights; -inf allowed (rows all -inf are flagged, never NaN).
    backend : {"auto", "torch", "triton"}

    Returns
    -------
    WeightStats
        log_weights (..., N), ess (...,), log_mean (...,), degenerate (...,) bool, as
        :func:`posterior.diagnostics.weights.log_weight_stats`.
    """
    check_float(log_weights, "log_weights")
    if resolve_backend(backend, log_weights) == "triton":
        return normalize_triton(log_weights)
    return normalize_reference(log_weights)


def resample(
    log_weights: torch.Tensor,
    num_samples: int,
    scheme: str,
    *,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Ancestor indices drawn by ``scheme`` from the normalised weights of each row.

    Parameters
    ----------
    log_weights : Tensor (..., N)
        Unnormalised log-weights; -inf allowed, NaN / +inf and all -inf rows raise.
    num_samples : int
        M >= 1, ancestors per row.
    scheme : str
        A name in ``posterior.kernels.schemes.RESAMPLERS``. "residual" has no kernel: "auto"
        runs its reference, "triton" raises.
    generator : torch.Generator, optional
        Both backends draw the same uniforms from it, so they return the same ancestors.
    backend : {"auto", "torch", "triton"}

    Returns
    -------
    Tensor (..., M) int64
    """
    if scheme not in RESAMPLERS:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {sorted(RESAMPLERS)}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive int")
    check_float(log_weights, "log_weights")
    chosen = resolve_backend(backend, log_weights)
    if is_row_streams(generator):
        if backend == "triton":
            raise ValueError("per-row streams (posterior.streams.Streams) are drawn by the torch backend only; use backend='auto' or 'torch'")
        chosen = "torch"
    if chosen == "triton" and scheme not in KERNEL_SCHEMES:
        if backend == "triton":
            raise ValueError(f"scheme={scheme!r} has no Triton kernel; choose one of {sorted(KERNEL_SCHEMES)}")
        chosen = "torch"
    if chosen == "triton":
        return resample_triton(log_weights, num_samples, scheme, generator=generator)
    return resample_reference(log_weights, num_samples, scheme, generator=generator)


def tilted_sample(
    logits: torch.Tensor,
    *,
    potential: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    beta: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> TiltedSample:
    """One token per row from q(v) ∝ p(v) exp(phi(v) / beta), p = softmax(logits / temperature).

    Parameters
    ----------
    logits : Tensor (B, V), fp32 or bf16
    potential : Tensor (B, V) dense, or (B, k) with ``candidates``; optional
        phi. Tokens not among the candidates have phi = 0; -inf forbids a token.
    candidates : Tensor (B, k) int64, optional
        Distinct token ids in [0, V) carrying the sparse potential (e.g. the prior's top-k).
    beta, temperature : float > 0
    generator : torch.Generator, optional
        Seeds the draw (reproducible per backend; the backends' draws differ, their laws agree).
    backend : {"auto", "torch", "triton"}

    Returns
    -------
    TiltedSample
        tokens (B,) int64, log_q (B,) fp32 = log q(token), log_norm (B,) fp32 =
        log sum_v p(v) exp(phi(v)/beta), the SMC incremental weight (0 when phi = 0).
    """
    check_tilted_inputs(logits, potential, candidates, beta, temperature)
    if is_row_streams(generator):  # per-row streams: the inverse-CDF backend draws one uniform per row
        if backend == "triton":
            raise ValueError("per-row streams (posterior.streams.Streams) are drawn by the torch backend only; use backend='auto' or 'torch'")
        run = tilted_sample_cpu
    elif resolve_backend(backend, logits) == "triton":
        run = tilted_sample_triton
    elif backend == "auto" and logits.device.type == "cpu":
        run = tilted_sample_cpu  # the fast CPU backend (float64 CDF inversion); "torch" is the literal reference
    else:
        run = tilted_sample_reference
    return run(
        logits, potential=potential, candidates=candidates, beta=beta, temperature=temperature, generator=generator
    )
