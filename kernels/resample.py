"""Fused resampling: log-weights (P, N) -> ancestor indices (P, M) in one launch.

Every scheme of :mod:`posterior.samplers.resampling` inverts the CDF of the normalised weights at
points u_m in [0, 1) (Douc & Cappé 2005):

    multinomial   u_m = U_m              U_m iid U[0, 1)
    stratified    u_m = (m + U_m) / M
    systematic    u_m = (m + U) / M      one U per row
    a_m = min { i : cdf_i > u_m }        cdf_i = sum_{j<=i} exp(x_j - max x) / sum_j exp(x_j - max x)

so a particle of weight 0 is never chosen (its CDF step is flat). One program per row: a pass for
the max (and to flag NaN / +inf / all -inf rows), a pass writing the running sum to a float64
workspace, a pass dividing it by its last entry (so cdf_{N-1} is exactly 1, as in the reference),
then a binary search per point.

Reproducibility: the launcher draws the uniforms U with torch from the caller's generator through
the reference's own ``_uniform``, in the reference's layout ((P, M) float64, (P, 1) for
systematic), and the kernel forms u_m with the same float64 operations, so the ancestors equal
``RESAMPLERS[scheme]`` for the same generator state. The CDFs agree to float64 rounding for fp64
input; for fp32 input the reference rounds the normalised log-weights to fp32 before going to
float64, so a point within ~1e-7 of a CDF step could in principle land one index apart.
"""

from __future__ import annotations

import torch

from posterior.diagnostics.weights import normalize
from .schemes import RESAMPLERS, _uniform

from ._common import tile_size, check_float, jit, num_warps, on_device, tl

# Scheme -> kernel constant. Residual resampling has no kernel (its deterministic copies are a
# different algorithm); the dispatcher runs its torch reference.
KERNEL_SCHEMES = {"multinomial": 0, "stratified": 1, "systematic": 2}
MAX_BLOCK_N = 4096
MAX_BLOCK_M = 1024

_OK, _DEGENERATE, _NON_FINITE = 0, 1, 2


def resample_reference(
    log_weights: torch.Tensor, num_samples: int, scheme: str, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The torch reference: ``posterior.kernels.schemes.RESAMPLERS[scheme]``. (..., M) int64."""
    if scheme not in RESAMPLERS:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {sorted(RESAMPLERS)}")
    return RESAMPLERS[scheme](log_weights, num_samples, generator=generator)


@jit
def _resample_kernel(
    lw_ptr,  # (P, N) log-weights, any float dtype
    u_ptr,  # (P, M) float64 uniforms; (P, 1) for systematic
    cdf_ptr,  # (P, N) float64 workspace
    out_ptr,  # (P, M) int64 ancestors
    status_ptr,  # (P,) int32: 0 ok, 1 every weight -inf, 2 NaN or +inf present
    N,
    M,
    n_steps,  # N.bit_length(): binary-search steps that shrink [0, N] to one point
    stride_lw,
    stride_u,
    SCHEME: tl.constexpr,  # 0 multinomial, 1 stratified, 2 systematic
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lw_row = lw_ptr + row * stride_lw
    cdf_row = cdf_ptr + row * N
    cols = tl.arange(0, BLOCK_N)

    # Pass 1: max over the finite part, flag NaN / +inf (replaced by -inf so nothing below makes NaN).
    m = tl.full((), float("-inf"), tl.float64)
    bad = tl.zeros((), tl.int32)
    for start in range(0, N, BLOCK_N):
        x = tl.load(lw_row + start + cols, mask=start + cols < N, other=float("-inf")).to(tl.float64)
        invalid = (x != x) | (x == float("inf"))
        bad = tl.maximum(bad, tl.max(invalid.to(tl.int32), 0))
        m = tl.maximum(m, tl.max(tl.where(invalid, float("-inf"), x), 0))
    shift = tl.where(m == float("-inf"), 0.0, m)

    # Pass 2: unnormalised CDF; each tile's scan continues from the previous tile's last value.
    carry = tl.zeros((), tl.float64)
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        x = tl.load(lw_row + start + cols, mask=mask, other=float("-inf")).to(tl.float64)
        x = tl.where((x != x) | (x == float("inf")), float("-inf"), x)
        c = tl.cumsum(tl.exp(x - shift), 0) + carry
        tl.store(cdf_row + start + cols, c, mask=mask)
        carry = tl.max(tl.where(mask, c, 0.0), 0)  # c is non-decreasing: its max is the last entry
    total = carry
    status = tl.where(bad > 0, 2, tl.where(total > 0.0, 0, 1))
    tl.store(status_ptr + row, status)

    # Pass 3: divide by the last entry, as the reference's c / c[..., -1:] (so cdf_{N-1} == 1 and u < 1
    # always finds an index). Each thread rereads what it wrote, so no barrier is needed yet.
    total = tl.where(total > 0.0, total, 1.0)
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        c = tl.load(cdf_row + start + cols, mask=mask, other=0.0)
        tl.store(cdf_row + start + cols, c / total, mask=mask)
    # The search reads entries other threads of this program wrote.
    tl.debug_barrier()

    # Search: smallest i with cdf_i > u (torch.searchsorted(..., right=True)), N if none.
    out_row = out_ptr + row * M
    u_row = u_ptr + row * stride_u
    for m_start in range(0, M, BLOCK_M):
        ms = m_start + tl.arange(0, BLOCK_M)
        m_mask = ms < M
        if SCHEME == 0:
            u = tl.load(u_row + ms, mask=m_mask, other=0.0)
        elif SCHEME == 1:
            u = (ms.to(tl.float64) + tl.load(u_row + ms, mask=m_mask, other=0.0)) / M
        else:
            u = (ms.to(tl.float64) + tl.load(u_row)) / M
        lo = tl.zeros((BLOCK_M,), tl.int32)
        hi = tl.zeros((BLOCK_M,), tl.int32) + N
        for _ in range(n_steps):
            active = lo < hi
            mid = (lo + hi) // 2  # < N while active
            c = tl.load(cdf_row + mid, mask=m_mask & active, other=0.0)
            right = c <= u
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & ~right, mid, hi)
        tl.store(out_row + ms, lo.to(tl.int64), mask=m_mask)


def resample_triton(
    log_weights: torch.Tensor,
    num_samples: int,
    scheme: str,
    *,
    generator: torch.Generator | None = None,
    max_block: int = MAX_BLOCK_N,
) -> torch.Tensor:
    """Launch :func:`_resample_kernel`; same contract and same draws as :func:`resample_reference`.

    Parameters
    ----------
    log_weights : Tensor (..., N)
        Unnormalised log-weights (any float dtype); -inf allowed, NaN / +inf rejected.
    num_samples : int
        M, ancestors per row.
    scheme : {"multinomial", "stratified", "systematic"}
    generator : torch.Generator, optional
        Source of the uniforms, drawn exactly as the reference draws them (on ``generator``'s
        device, which must be that of ``log_weights``); None uses torch's default generator.
    max_block : int
        Largest tile over N (a power of two); tests lower it to cover the multi-tile path.

    Returns
    -------
    Tensor (..., M) int64
        Ancestor indices in [0, N).

    Raises
    ------
    ValueError
        Unknown scheme, bad shapes, or NaN / +inf in ``log_weights`` (same message as the reference).
    DegenerateWeightsError
        A row whose weights are all -inf (same message as the reference).
    """
    if scheme not in KERNEL_SCHEMES:
        raise ValueError(f"scheme={scheme!r} has no Triton kernel; choose one of {sorted(KERNEL_SCHEMES)}")
    check_float(log_weights, "log_weights")
    if log_weights.dim() == 0 or log_weights.shape[-1] == 0:
        raise ValueError(f"log_weights has shape {tuple(log_weights.shape)}; expected (..., N) with N >= 1")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive int")
    batch, n = log_weights.shape[:-1], log_weights.shape[-1]
    block_n = tile_size(n, max_block=max_block, what="N (particles)")
    block_m = tile_size(num_samples, max_block=MAX_BLOCK_M, what="num_samples")
    x = log_weights.reshape(-1, n)  # (P, N)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    # The reference's draw, same call and shape, so the generator advances identically.
    u = _uniform((*batch, 1 if scheme == "systematic" else num_samples), x, generator).reshape(rows, -1)  # (P, M|1)
    out = torch.empty((rows, num_samples), dtype=torch.int64, device=x.device)  # (P, M)
    if rows == 0:
        return out.reshape(*batch, num_samples)
    cdf = torch.empty((rows, n), dtype=torch.float64, device=x.device)  # (P, N) workspace
    status = torch.empty(rows, dtype=torch.int32, device=x.device)  # (P,)
    with on_device(x):
        _resample_kernel[(rows,)](
            x, u, cdf, out, status, n, num_samples, n.bit_length(), x.stride(0), u.stride(0),
            SCHEME=KERNEL_SCHEMES[scheme], BLOCK_N=block_n, BLOCK_M=block_m, num_warps=num_warps(block_n),
            enable_fp_fusion=False,  # keep (m + U) / M and c / total rounded exactly as torch rounds them
        )  # fmt: skip
    if bool((status != _OK).any()):  # one device sync, as the reference's own check
        normalize(log_weights)  # raises the reference's ValueError / DegenerateWeightsError
        raise RuntimeError(f"resample kernel flagged rows {status.nonzero().flatten().tolist()} the reference accepts")
    return out.reshape(*batch, num_samples)
