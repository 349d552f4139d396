"""Shared plumbing for the Triton kernels: guarded import, backend choice, block sizes.

Triton ships only for Linux, so it is imported here once, guarded: where it is missing,
``triton`` and ``tl`` are ``None``, :func:`jit` leaves the kernel functions undecorated (they are
never called: every public function falls back to its torch reference) and ``import
posterior.kernels`` still works. Kernel modules use ``from __future__ import annotations`` so that
``BLOCK: tl.constexpr`` annotations are strings, which Triton reads and a missing Triton never
evaluates.

``TRITON_INTERPRET=1`` is read by Triton when a kernel is *decorated*, i.e. when
``posterior.kernels`` is first imported; set it before that import to run kernels on CPU tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / Windows: torch without triton
    triton = None
    tl = None

HAS_TRITON = triton is not None

# Whether the kernels below are decorated for Triton's CPU interpreter (frozen at import, as in Triton).
if HAS_TRITON and hasattr(triton, "knobs"):
    INTERPRET = bool(triton.knobs.runtime.interpret)
else:  # triton < 3.4 has no knobs
    INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")

BACKENDS = ("auto", "torch", "triton")

# Elements per tile. Beyond 2**14 fp32 values a program's tile no longer fits in registers on current
# GPUs (Triton spills or refuses); every kernel loops over tiles, so rows longer than a tile are fine.
MAX_BLOCK = 2**14
# Indices inside the kernels are int32 (row offsets are int64): a row may hold at most this many
# elements, which leaves headroom for one tile past the end.
MAX_ROW = 2**30


def jit(fn: Callable) -> Callable:
    """``triton.jit`` when Triton imports, else the plain function (never called: torch fallback)."""
    return triton.jit(fn) if HAS_TRITON else fn


def uniform(shape, generator, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """U[0, 1) draws: ``torch.rand`` from a ``torch.Generator`` (or torch's default for None), or
    ``generator.uniform(shape, dtype=, device=)`` for a per-row stream set (``posterior.streams.Streams``:
    row r of the leading axis from its own stream; duck-typed, so kernels do not import it)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, dtype=dtype, device=device)
    return generator.uniform(shape, dtype=dtype, device=device)


def is_row_streams(generator) -> bool:
    """True for a per-row stream set (anything but None or a ``torch.Generator``): only the torch
    backends draw from it (the Triton kernels take one Philox seed)."""
    return generator is not None and not isinstance(generator, torch.Generator)


def tile_size(n: int, *, max_block: int, what: str = "row length") -> int:
    """Tile size for a row of ``n`` elements: the next power of two >= n, capped at ``max_block``.

    Kernels loop over tiles, so ``n`` may exceed the tile; the limits are ``max_block`` itself
    (a power of two in [16, MAX_BLOCK]) and ``n <= MAX_ROW`` (int32 in-kernel indices).

    Raises
    ------
    ValueError
        naming ``n`` or ``max_block`` when either is out of range.
    """
    if max_block < 16 or max_block > MAX_BLOCK or max_block & (max_block - 1):
        raise ValueError(f"max_block={max_block} must be a power of two in [16, {MAX_BLOCK}]")
    if n < 1:
        raise ValueError(f"{what}={n} must be at least 1")
    if n > MAX_ROW:
        raise ValueError(
            f"{what}={n} is above the kernels' limit of {MAX_ROW} elements per row (int32 indices); "
            f"use backend='torch'"
        )
    return min(max(16, 1 << (n - 1).bit_length()), max_block)


def num_warps(block: int) -> int:
    """Warps per program for a tile of ``block`` elements: about 16 fp32 values per thread."""
    return 4 if block <= 2048 else 8 if block <= 4096 else 16


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU current for a launch (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Map ``backend`` in {"auto", "torch", "triton"} to "torch" or "triton" for ``tensor``.

    "auto" is Triton for CUDA tensors when Triton imports, else the torch reference. "triton" is
    honoured or fails clearly: Triton missing, or a CPU tensor without ``TRITON_INTERPRET=1``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if (HAS_TRITON and tensor.is_cuda) else "torch"
    if not HAS_TRITON:
        raise ValueError("backend='triton' but triton is not installed (pip install triton, Linux only)")
    if not tensor.is_cuda and not INTERPRET:
        raise ValueError(
            f"backend='triton' with a tensor on {tensor.device}: Triton kernels run on CUDA tensors, or on "
            f"the CPU when TRITON_INTERPRET=1 is set before posterior.kernels is imported"
        )
    return "triton"


def check_float(x: torch.Tensor, what: str, *, ndim: int | None = None) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``x`` is a floating tensor (of ``ndim`` dims)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")  # noqa: TRY004 (house style)
    if not x.is_floating_point():
        raise ValueError(f"{what} has dtype {x.dtype}; expected a floating dtype")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{what} has shape {tuple(x.shape)}; expected {ndim} dimensions")
