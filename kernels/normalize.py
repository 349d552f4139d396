"""Fused log-weight normalisation: normalised log-weights, ESS and log-mean-exp in one read.

For one row of log-weights x_1..x_N the kernel keeps, over tiles, a running max m and the rescaled
sums (the online softmax of Milakov & Gimelshein 2018)

    s  = sum_i exp(x_i - m)          s2 = sum_i exp(2 (x_i - m))

rescaling both by exp(m_old - m_new) (s2 by its square) when the max grows. Then

    logsumexp = m + log s      ESS = s^2 / s2 = 1 / sum_i w̄_i^2      log mean exp = m + log s - log N

The statistics need that one read; a second pass re-reads the row to store x_i - logsumexp. The result is the same
:class:`~posterior.diagnostics.weights.WeightStats` as the reference
:func:`~posterior.diagnostics.weights.log_weight_stats` (Kong 1992 for the ESS): rows whose weights
are all -inf are flagged ``degenerate`` with ESS 0, log-mean -inf and normalised weights -inf, and
never produce NaN. Like the reference, NaN and +inf inputs are not checked here.
"""

from __future__ import annotations

import torch

from posterior.diagnostics.weights import WeightStats, log_weight_stats

from ._common import tile_size, check_float, jit, num_warps, on_device, tl

# Largest tile: one tile covers the rows up to N = 4096 that samplers use; longer rows loop.
MAX_BLOCK_N = 4096


def normalize_reference(log_weights: torch.Tensor) -> WeightStats:
    """The torch reference: :func:`posterior.diagnostics.weights.log_weight_stats` itself."""
    return log_weight_stats(log_weights)


@jit
def _normalize_kernel(
    x_ptr,  # (P, N) log-weights, any float dtype
    out_ptr,  # (P, N) normalised log-weights, fp32 (fp64 for fp64 input): the compute dtype
    ess_ptr,  # (P,)
    log_mean_ptr,  # (P,)
    degenerate_ptr,  # (P,) bool
    N,
    stride_x,
    stride_out,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)

    m = tl.full((), float("-inf"), dtype)  # running max
    s = tl.zeros((), dtype)  # sum exp(x - m)
    s2 = tl.zeros((), dtype)  # sum exp(2 (x - m))
    for start in range(0, N, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < N, other=float("-inf")).to(dtype)
        m_new = tl.maximum(m, tl.max(x, 0))
        # While every weight seen is -inf, shift by 0 instead: exp(-inf - 0) = 0 where -inf - -inf is NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp(x - shift)
        scale = tl.exp(m - shift)  # <= 1; 0 on the first finite tile
        s = s * scale + tl.sum(e, 0)
        s2 = s2 * (scale * scale) + tl.sum(e * e, 0)
        m = m_new

    degenerate = m == float("-inf")
    lse = m + tl.log(tl.where(degenerate, 1.0, s))  # -inf + log 1 = -inf on degenerate rows
    ess = s * s / tl.where(degenerate, 1.0, s2)  # 0 / 1 = 0 on degenerate rows
    tl.store(ess_ptr + row, ess)
    tl.store(log_mean_ptr + row, lse - tl.log(N.to(dtype)))
    tl.store(degenerate_ptr + row, degenerate)

    # As the reference: subtract 0 on degenerate rows, which keeps their -inf and makes no NaN.
    shift = tl.where(degenerate, 0.0, lse)
    out_row = out_ptr + row * stride_out
    for start in range(0, N, BLOCK):
        mask = start + cols < N
        x = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(dtype)
        tl.store(out_row + start + cols, x - shift, mask=mask)


def normalize_triton(log_weights: torch.Tensor, *, max_block: int = MAX_BLOCK_N) -> WeightStats:
    """Launch :func:`_normalize_kernel`: one program per row, looping over tiles of the row.

    Parameters
    ----------
    log_weights : Tensor (..., N)
        Unnormalised log-weights, fp16 / bf16 / fp32 (computed in fp32) or fp64; -inf allowed.
    max_block : int
        Largest tile (a power of two); rows longer than the tile loop. Tests lower it to cover
        the multi-tile path on small N.

    Returns
    -------
    WeightStats
        ``log_weights`` (..., N) normalised, ``ess`` (...,), ``log_mean`` (...,), ``degenerate``
        (...,) bool; fp32 for 16/32-bit input, fp64 for fp64, exactly as the reference.
    """
    check_float(log_weights, "log_weights")
    if log_weights.dim() == 0 or log_weights.shape[-1] == 0:
        raise ValueError(f"log_weights has shape {tuple(log_weights.shape)}; expected (..., N) with N >= 1")
    batch, n = log_weights.shape[:-1], log_weights.shape[-1]
    block = tile_size(n, max_block=max_block, what="N (particles)")
    x = log_weights.reshape(-1, n)  # (P, N)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty((rows, n), dtype=dtype, device=x.device)  # (P, N)
    ess = torch.empty(rows, dtype=dtype, device=x.device)  # (P,)
    log_mean = torch.empty(rows, dtype=dtype, device=x.device)  # (P,)
    degenerate = torch.empty(rows, dtype=torch.bool, device=x.device)  # (P,)
    if rows > 0:
        with on_device(x):
            _normalize_kernel[(rows,)](
                x, out, ess, log_mean, degenerate, n, x.stride(0), out.stride(0),
                BLOCK=block, num_warps=num_warps(block), enable_fp_fusion=True,
            )  # fmt: skip
    return WeightStats(out.reshape(*batch, n), ess.reshape(batch), log_mean.reshape(batch), degenerate.reshape(batch))
