"""Resampling schemes: ``(log_weights[..., N], num_samples, *, generator) -> ancestors[..., M]``.

Every scheme draws ancestor ``a_m`` by inverting the CDF of the normalised weights at a point
``u_m`` in [0, 1); they differ only in how the points are laid out (Douc & Cappé 2005; Chopin &
Papaspiliopoulos 2020, ch. 9):

    multinomial   u_m iid U[0, 1)
    stratified    u_m = (m + U_m) / M,  U_m iid U[0, 1)
    systematic    u_m = (m + U) / M,    one U per row
    residual      floor(M w_i) copies of i, the remaining R = M - sum floor(M w_i) drawn
                  multinomially from the residuals M w_i - floor(M w_i)

All are unbiased: E[#offspring of i] = M w_i. Stratified, systematic and residual have lower
variance than multinomial. Gathering particles (and reordering KV caches) by the returned
ancestors is a separate step. Schemes are registered by name in ``RESAMPLERS``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from posterior.diagnostics.weights import normalize

from ._common import uniform


class Resampler(Protocol):
    def __call__(
        self, log_weights: torch.Tensor, num_samples: int, *, generator: torch.Generator | None
    ) -> torch.Tensor: ...


RESAMPLERS: dict[str, Resampler] = {}


def register_resampler(name: str) -> Callable[[Resampler], Resampler]:
    def deco(fn: Resampler) -> Resampler:
        RESAMPLERS[name] = fn
        return fn

    return deco


def get_resampler(name: str) -> Resampler:
    try:
        return RESAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown resampling scheme {name!r}; choose one of {sorted(RESAMPLERS)}") from None


def _cdf(log_weights: torch.Tensor) -> torch.Tensor:
    """Normalised CDF along the last axis in float64, last entry exactly 1."""
    w = normalize(log_weights).log_weights.double().exp()  # (..., N)
    c = torch.cumsum(w, dim=-1)
    return c / c[..., -1:]


def inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Smallest i with cdf[i] > u (so zero-weight particles are never chosen). (..., M) int64."""
    return torch.searchsorted(cdf.contiguous(), u.to(cdf.dtype).contiguous(), right=True)


def _uniform(shape, like: torch.Tensor, generator) -> torch.Tensor:
    return uniform(shape, generator, dtype=torch.float64, device=like.device)


@register_resampler("multinomial")
def multinomial(log_weights, num_samples, *, generator=None):
    cdf = _cdf(log_weights)
    u = _uniform((*cdf.shape[:-1], num_samples), cdf, generator)
    return inverse_cdf(cdf, u)


def _stratified_points(batch_shape, num_samples, like, generator, *, one_per_row: bool):
    m = torch.arange(num_samples, dtype=torch.float64, device=like.device)
    u = _uniform((*batch_shape, 1 if one_per_row else num_samples), like, generator)
    return (m + u) / num_samples


@register_resampler("stratified")
def stratified(log_weights, num_samples, *, generator=None):
    cdf = _cdf(log_weights)
    return inverse_cdf(cdf, _stratified_points(cdf.shape[:-1], num_samples, cdf, generator, one_per_row=False))


@register_resampler("systematic")
def systematic(log_weights, num_samples, *, generator=None):
    cdf = _cdf(log_weights)
    return inverse_cdf(cdf, _stratified_points(cdf.shape[:-1], num_samples, cdf, generator, one_per_row=True))


@register_resampler("residual")
def residual(log_weights, num_samples, *, generator=None):
    w = normalize(log_weights.double()).log_weights.exp()  # (..., N) normalised in float64: M·w must be exact
    scaled = num_samples * w
    # (..., N) deterministic copies; the slack keeps M·w that rounds to just below an integer
    # (7 · 1/7 = 0.999...) from losing its copy.
    det = torch.floor(scaled + 1e-9)
    rest = (scaled - det).clamp(min=0.0)
    n_rest = (num_samples - det.sum(-1)).round().long()  # (...,) residual draws per row, in [0, N)
    # Draw M residual ancestors per row and keep the first n_rest of each (rows differ in n_rest).
    safe_rest = torch.where(rest.sum(-1, keepdim=True) > 0, rest, torch.ones_like(rest))
    c = torch.cumsum(safe_rest, dim=-1)
    draws = inverse_cdf(c / c[..., -1:], _uniform((*w.shape[:-1], num_samples), w, generator))  # (..., M)
    keep = torch.arange(num_samples, device=w.device) < n_rest.unsqueeze(-1)  # (..., M)
    counts = det.long().scatter_add(-1, draws, keep.long())  # (..., N) offspring counts, sum M
    # Offspring counts -> sorted ancestor indices.
    slots = torch.arange(num_samples, device=w.device).expand(*w.shape[:-1], num_samples)
    return torch.searchsorted(torch.cumsum(counts, -1).contiguous(), slots.contiguous(), right=True)


def offspring_counts(ancestors: torch.Tensor, num_particles: int) -> torch.Tensor:
    """Number of times each particle was chosen: (..., M) ancestors -> (..., N) counts."""
    counts = torch.zeros(*ancestors.shape[:-1], num_particles, dtype=torch.long, device=ancestors.device)
    return counts.scatter_add(-1, ancestors, torch.ones_like(ancestors))
