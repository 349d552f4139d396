"""Tilted token sampling: draw one token per row from q(v) ∝ p(v) exp(phi(v) / beta), in one pass.

With z_v = logits_v / T (so p = softmax(z)) and y_v = z_v + phi_v / beta, the proposal is
q = softmax(y), and the sequential-Monte-Carlo incremental weight is

    log_norm = log sum_v p(v) exp(phi_v / beta) = logsumexp(y) - logsumexp(z)      (0 when phi = 0)
    log_q    = y_token - logsumexp(y)

(twisted / tilted proposals: Naesseth et al. 2019, Zhao et al. 2024, "Probabilistic inference in
language models via twisted SMC"). The kernel reads the vocabulary once per row, keeping the
online logsumexp of z and of y (running max + rescaled sum per tile) and the Gumbel-max sample

    token = argmax_v (y_v + G_v),    G_v = -log(-log U_v),  U_v ~ U(0, 1)

whose law is exactly softmax(y) (Gumbel 1954; Maddison et al. 2014). The uniforms come from
Triton's counter-based Philox inside the kernel: token v of row r uses counter (v // 4, r), output
v % 4, under one seed the launcher draws from the caller's ``torch.Generator``. No (B, V) noise is
materialised, and the draw does not depend on the tile size.

Limits of the noise: U takes the 2**23 values (k + 1/2) 2**-23 (23 of Philox's 32 bits, so U is
exact in fp32 and never 0 or 1), which truncates G to about [-2.8, 16.6] and discretises it: the
law of the token is off from q by O(1e-7) per draw, far below what any test or sampler can see.

Sparse potentials (top-k candidates, phi = 0 elsewhere). The launcher sorts each row's k candidates
(with their phi); the kernel walks them with a pointer alongside the vocabulary tiles and scatters
each candidate's phi into its tile by one compare-and-select over the tile: k x BLOCK_V selects per
row in all, one scalar test for a tile without candidates, and no (B, V) dense potential. (A 2-D
(BLOCK_V x chunk-of-k) compare was tried first: ptxas took minutes on it at BLOCK_V = 4096.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._common import tile_size, check_float, jit, num_warps, on_device, tl, uniform

MAX_BLOCK_V = 4096
MAX_BLOCK_K = 64

_OK, _DEGENERATE, _NON_FINITE = 0, 1, 2


class TiltedSample(NamedTuple):
    tokens: torch.Tensor  # (B,) int64, drawn from q
    log_q: torch.Tensor  # (B,) fp32 (float64 from the CPU backend), log q(token)
    log_norm: torch.Tensor  # (B,) likewise, log sum_v p(v) exp(phi(v)/beta): the SMC incremental weight


# ----------------------------------------------------------------------------------------------------
# Validation shared by both backends.


def _check_positive(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={value!r} must be a positive finite number") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{what}={value!r} must be a positive finite number")
    if 1.0 / value > torch.finfo(torch.float32).max:  # the kernel multiplies by 1 / value in fp32
        raise ValueError(f"{what}={value!r} is too small: 1/{what} overflows float32")
    return value


def check_tilted_inputs(
    logits: torch.Tensor,
    potential: torch.Tensor | None,
    candidates: torch.Tensor | None,
    beta: float,
    temperature: float,
) -> tuple[str, float, float]:
    """Validate shapes, dtypes and the scalars; return (mode, beta, temperature), mode in
    {"none", "dense", "sparse"}. Values inside the tensors (NaN, out-of-range candidates) are
    checked by each backend."""
    beta = _check_positive(beta, "beta")
    temperature = _check_positive(temperature, "temperature")
    check_float(logits, "logits", ndim=2)
    if logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; expected (B, V) with B, V >= 1")
    if potential is None:
        if candidates is not None:
            raise ValueError("candidates were given without a potential")
        return "none", beta, temperature
    check_float(potential, "potential", ndim=2)
    if potential.device != logits.device:
        raise ValueError(f"potential is on {potential.device} but logits on {logits.device}")
    if candidates is None:
        if potential.shape != logits.shape:
            raise ValueError(
                f"dense potential has shape {tuple(potential.shape)}; expected logits' shape {tuple(logits.shape)} "
                f"(for a sparse potential pass candidates too)"
            )
        return "dense", beta, temperature
    if not isinstance(candidates, torch.Tensor) or candidates.dtype != torch.int64:
        raise ValueError(f"candidates must be an int64 tensor, got {getattr(candidates, 'dtype', type(candidates))}")
    if candidates.device != logits.device:
        raise ValueError(f"candidates are on {candidates.device} but logits on {logits.device}")
    if candidates.dim() != 2 or candidates.shape[0] != logits.shape[0] or candidates.shape != potential.shape:
        raise ValueError(
            f"candidates {tuple(candidates.shape)} and potential {tuple(potential.shape)} must both be "
            f"(B, k) with B = {logits.shape[0]}"
        )
    return "sparse", beta, temperature


def _bad_candidate_rows(candidates: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort candidates per row; flag rows with an index outside [0, V) or listed twice. (B, k), (B,)."""
    order = torch.sort(candidates, dim=-1)
    cand = order.values  # (B, k) ascending
    bad = (cand < 0).any(-1) | (cand >= vocab).any(-1) | (cand[:, 1:] == cand[:, :-1]).any(-1)  # (B,)
    return order, bad


def _raise_for_rows(status: torch.Tensor, bad_candidates: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the rows whose status is not OK (one device sync)."""
    flags = status.clone()
    if bad_candidates is not None:
        flags = torch.where(bad_candidates, torch.full_like(flags, 3), flags)
    if not bool((flags != _OK).any()):
        return
    messages = []
    for code, text in (
        (3, "candidates out of [0, V) or repeated"),
        (_NON_FINITE, "NaN or +inf in logits or potential (or in phi / beta)"),
        (_DEGENERATE, "q is zero for every token (all logits -inf, or the potential is -inf wherever p > 0)"),
    ):
        rows = (flags == code).nonzero().flatten().tolist()
        if rows:
            messages.append(f"{text} in row(s) {rows}")
    raise ValueError("tilted_sample: " + "; ".join(messages))


# ----------------------------------------------------------------------------------------------------
# Reference.


def tilted_log_probs(
    logits: torch.Tensor,
    *,
    potential: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    beta: float = 1.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log q over the vocabulary and log_norm, materialised in fp32 (the reference's numerics).

    Parameters are those of :func:`tilted_sample_reference`.

    Returns
    -------
    log_q : Tensor (B, V) fp32
        log_softmax(log p + phi / beta).
    log_norm : Tensor (B,) fp32
        logsumexp(log p + phi / beta) = log sum_v p(v) exp(phi_v / beta).

    Raises
    ------
    ValueError
        As :func:`tilted_sample_triton`.
    """
    mode, beta, temperature = check_tilted_inputs(logits, potential, candidates, beta, temperature)
    b, v = logits.shape
    logits = logits.float()
    if mode == "dense":
        phi = potential.float()  # (B, V)
    elif mode == "sparse":
        # Checked first: scatter_ needs valid indices.
        _raise_for_rows(torch.zeros(b, dtype=torch.int32, device=logits.device), _bad_candidate_rows(candidates, v)[1])
        phi = torch.zeros_like(logits).scatter_(1, candidates, potential.float())  # (B, V)
    else:
        phi = torch.zeros_like(logits)
    log_p = torch.log_softmax(logits / temperature, dim=-1)  # (B, V); NaN on rows of all -inf logits
    y = log_p + phi / beta  # (B, V) unnormalised log q
    log_norm = torch.logsumexp(y, dim=-1)  # (B,)
    all_neg_inf = logits.isneginf().all(-1)  # (B,)
    non_finite = (logits.isnan() | logits.isposinf() | phi.isnan() | phi.isposinf()).any(-1)
    non_finite |= ~all_neg_inf & (log_norm.isnan() | log_norm.isposinf())  # phi / beta overflowed (tiny beta)
    degenerate = all_neg_inf | log_norm.isneginf()
    status = torch.where(non_finite, _NON_FINITE, torch.where(degenerate, _DEGENERATE, _OK)).to(torch.int32)
    _raise_for_rows(status, None)
    return y - log_norm[:, None], log_norm


def tilted_sample_reference(
    logits: torch.Tensor,
    *,
    potential: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    beta: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> TiltedSample:
    """Materialise log q over the vocabulary (:func:`tilted_log_probs`) and draw with ``torch.multinomial``.

    Parameters
    ----------
    logits : Tensor (B, V), fp32 or bf16 (fp16 works too)
    potential : Tensor (B, V) dense, or (B, k) with ``candidates``; optional
        phi; tokens not among the candidates have phi = 0. -inf allowed (forbids a token).
    candidates : Tensor (B, k) int64, optional
        Distinct token ids in [0, V) carrying the sparse potential.
    beta, temperature : float > 0
    generator : torch.Generator, optional
        Drives ``torch.multinomial``; None is torch's default generator.

    Returns
    -------
    TiltedSample
        tokens (B,) int64, log_q (B,) fp32, log_norm (B,) fp32.
    """
    log_q, log_norm = tilted_log_probs(
        logits, potential=potential, candidates=candidates, beta=beta, temperature=temperature
    )  # (B, V), (B,)
    tokens = torch.multinomial(log_q.exp(), 1, generator=generator).squeeze(-1)  # (B,)
    return TiltedSample(tokens, log_q.gather(1, tokens[:, None]).squeeze(-1), log_norm)


def tilted_sample_cpu(
    logits: torch.Tensor,
    *,
    potential: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    beta: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    chunk: int = 4,
) -> TiltedSample:
    """The CPU backend: one uniform per row inverts a float64 CDF of q, ``chunk`` rows at a time.

    Same law and outputs as :func:`tilted_sample_reference` (inputs validated the same way), but
    ``torch.multinomial`` costs ~1.4 ms per row at V = 49k and the reference materialises several
    (B, V) fp32 arrays; this is ~4x faster with about 3 · chunk · V float64 values of extra memory.
    log_q and log_norm are computed and returned in float64 (the other backends return fp32).

    Parameters are those of :func:`tilted_sample_reference`; ``chunk`` is rows per pass. The
    generator draws B uniforms in row order.
    """
    mode, beta, temperature = check_tilted_inputs(logits, potential, candidates, beta, temperature)
    b, v = logits.shape
    if mode == "sparse":
        _raise_for_rows(torch.zeros(b, dtype=torch.int32, device=logits.device), _bad_candidate_rows(candidates, v)[1])
    u = uniform((b, 1), generator, dtype=torch.float64, device=logits.device)  # (B, 1): row r's from stream r with Streams
    tokens = torch.empty(b, dtype=torch.long, device=logits.device)
    log_q = torch.empty(b, dtype=torch.float64, device=logits.device)
    log_norm = torch.empty(b, dtype=torch.float64, device=logits.device)
    status = torch.zeros(b, dtype=torch.int32, device=logits.device)
    for s in range(0, b, chunk):
        rows = slice(s, s + chunk)
        z = logits[rows].double()  # (c, V)
        if temperature != 1.0:
            z = z / temperature
        log_z = torch.logsumexp(z, -1)  # (c,)
        if mode == "dense":
            y = z + potential[rows].double() / beta
        elif mode == "sparse":
            y = z.scatter_add(1, candidates[rows], potential[rows].double() / beta)
        else:
            y = z
        log_y = torch.logsumexp(y, -1)  # (c,)
        bad = y.isnan().any(-1) | y.isposinf().any(-1) | log_y.isnan() | log_y.isposinf()
        dead = ~bad & log_y.isneginf()
        status[rows] = torch.where(bad, _NON_FINITE, torch.where(dead, _DEGENERATE, _OK)).to(torch.int32)
        if bool((bad | dead).any()):
            continue
        cdf = torch.cumsum((y - log_y[:, None]).exp_(), -1)  # (c, V)
        tok = torch.searchsorted(cdf, u[rows] * cdf[:, -1:], right=True).squeeze(1).clamp_(max=v - 1)
        tokens[rows], log_norm[rows] = tok, log_y - log_z
        log_q[rows] = y.gather(1, tok[:, None]).squeeze(1) - log_y
    _raise_for_rows(status, None)
    return TiltedSample(tokens, log_q, log_norm)


# ----------------------------------------------------------------------------------------------------
# Kernel.


@jit
def _tilted_kernel(
    logits_ptr,  # (B, V) fp32 / bf16 / fp16
    pot_ptr,  # (B, V) dense or (B, K) sparse potential; unused when PHI == 0
    cand_ptr,  # (B, K) int32 candidate ids, ascending per row; unused unless PHI == 2
    seed_ptr,  # (1,) int64 Philox seed
    tokens_ptr,  # (B,) int64
    log_q_ptr,  # (B,) fp32
    log_norm_ptr,  # (B,) fp32
    status_ptr,  # (B,) int32: 0 ok, 1 q == 0 everywhere, 2 NaN / +inf in logits or potential
    V,
    K,
    stride_logits,
    stride_pot,
    stride_cand,
    inv_temperature,
    inv_beta,
    PHI: tl.constexpr,  # 0 none, 1 dense, 2 sparse
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    pot_row = pot_ptr + row * stride_pot
    cand_row = cand_ptr + row * stride_cand
    seed = tl.load(seed_ptr)
    lanes = tl.arange(0, BLOCK_V)
    quarter = tl.arange(0, BLOCK_V // 4)

    # Helpers are written inline: each nested @jit call costs milliseconds in the CPU interpreter.
    m_z = tl.full((), float("-inf"), tl.float32)  # logsumexp of z = logits / T: running max, rescaled sum
    s_z = tl.zeros((), tl.float32)
    m_y = tl.full((), float("-inf"), tl.float32)  # logsumexp of y = z + phi / beta
    s_y = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)  # Gumbel-max: best y + G so far, and its token
    best_token = tl.zeros((), tl.int32)
    bad = tl.zeros((), tl.int32)
    if PHI == 2:
        # Walk the ascending candidates alongside the tiles: ptr = next unused one, nxt = its token id
        # (a sentinel past every tile once all K are used).
        ptr = tl.zeros((), tl.int32)
        nxt = tl.load(cand_row, mask=K > 0, other=2147483647)

    for start in range(0, V, BLOCK_V):
        tokens = start + lanes
        mask = tokens < V
        x = tl.load(logits_row + tokens, mask=mask, other=float("-inf")).to(tl.float32)
        invalid = (x != x) | (x == float("inf"))
        z = tl.where(invalid, float("-inf"), x) * inv_temperature
        if PHI == 1:
            phi = tl.load(pot_row + tokens, mask=mask, other=0.0).to(tl.float32)
            invalid = invalid | (phi != phi) | (phi == float("inf"))
            y = z + tl.where(invalid, 0.0, phi) * inv_beta
        elif PHI == 2:
            # Scatter each candidate of this tile into its lane (compare-and-select over the tile):
            # K x BLOCK_V selects per row in all; a tile without candidates costs one comparison.
            phi = tl.zeros((BLOCK_V,), tl.float32)
            while nxt < start + BLOCK_V:
                pot = tl.load(pot_row + ptr).to(tl.float32)
                pot_bad = (pot != pot) | (pot == float("inf"))
                bad = tl.maximum(bad, pot_bad.to(tl.int32))
                phi = tl.where(tokens == nxt, tl.where(pot_bad, 0.0, pot), phi)
                ptr += 1
                nxt = tl.load(cand_row + ptr, mask=ptr < K, other=2147483647)
            y = z + phi * inv_beta
        else:
            y = z
        bad = tl.maximum(bad, tl.max(invalid.to(tl.int32), 0))

        # Online logsumexp; while all seen is -inf shift by 0, as -inf - -inf would be NaN.
        m_new = tl.maximum(m_z, tl.max(z, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_z = s_z * tl.exp(m_z - shift) + tl.sum(tl.exp(z - shift), 0)
        m_z = m_new
        if PHI != 0:
            m_new = tl.maximum(m_y, tl.max(y, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_y = s_y * tl.exp(m_y - shift) + tl.sum(tl.exp(y - shift), 0)
            m_y = m_new

        # Four uniforms per Philox call: token start + 4i + j takes output j of counter start / 4 + i,
        # i.e. token v always gets output v % 4 of counter v // 4 (the row is the counter's high word).
        r0, r1, r2, r3 = tl.randint4x(seed, row * 4294967296 + start // 4 + quarter)
        r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_V,))
        # 23 random bits -> U = (k + 1/2) 2**-23, exact in fp32 and strictly inside (0, 1).
        u = ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        gumbel = -tl.log(-tl.log(u))
        tile_best, tile_arg = tl.max(y + gumbel, 0, return_indices=True)
        take = tile_best > best  # strict: ties keep the earlier token
        best = tl.where(take, tile_best, best)
        best_token = tl.where(take, start + tile_arg, best_token)

    lse_z = m_z + tl.log(tl.where(s_z > 0.0, s_z, 1.0))  # -inf when every logit is -inf
    if PHI == 0:
        lse_y = lse_z
    else:
        lse_y = m_y + tl.log(tl.where(s_y > 0.0, s_y, 1.0))
    # phi / beta can overflow to +inf for a tiny beta: flag it with the non-finite inputs.
    bad = tl.maximum(bad, ((lse_y != lse_y) | (lse_y == float("inf"))).to(tl.int32))
    status = tl.where(bad > 0, 2, tl.where(lse_y == float("-inf"), 1, 0))

    # y at the chosen token, recomputed from its logit and potential (two scalar loads).
    x_tok = tl.load(logits_row + best_token).to(tl.float32)
    y_tok = tl.where((x_tok != x_tok) | (x_tok == float("inf")), float("-inf"), x_tok) * inv_temperature
    if PHI == 1:
        phi_tok = tl.load(pot_row + best_token).to(tl.float32)
        y_tok += tl.where((phi_tok != phi_tok) | (phi_tok == float("inf")), 0.0, phi_tok) * inv_beta
    elif PHI == 2:
        phi_tok = tl.zeros((), tl.float32)
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            cand = tl.load(cand_row + ks, mask=k_mask, other=-1)
            pot = tl.load(pot_row + ks, mask=k_mask, other=0.0).to(tl.float32)
            pot = tl.where((pot != pot) | (pot == float("inf")), 0.0, pot)
            phi_tok += tl.sum(tl.where(cand == best_token, pot, 0.0), 0)
        y_tok += phi_tok * inv_beta

    # Degenerate rows (status 1) store -inf / NaN-free placeholders; the launcher raises on them.
    ok = status == 0
    tl.store(tokens_ptr + row, best_token.to(tl.int64))
    tl.store(log_q_ptr + row, tl.where(ok, y_tok - tl.where(ok, lse_y, 0.0), float("-inf")))
    tl.store(log_norm_ptr + row, tl.where(ok, lse_y - tl.where(ok, lse_z, 0.0), float("-inf")))
    tl.store(status_ptr + row, status)


def tilted_sample_triton(
    logits: torch.Tensor,
    *,
    potential: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    beta: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    max_block: int = MAX_BLOCK_V,
) -> TiltedSample:
    """Launch :func:`_tilted_kernel`: one program per row, one read of the vocabulary.

    Parameters are those of :func:`tilted_sample_reference`, plus ``max_block``, the largest tile
    over V (a power of two >= 16; tests lower it). ``generator`` only supplies the kernel's Philox
    seed (one int64 draw, on the generator's device), so draws are reproducible for a seeded
    generator but differ from the reference's ``torch.multinomial`` draws.

    Returns
    -------
    TiltedSample
        tokens (B,) int64, log_q (B,) fp32, log_norm (B,) fp32.

    Raises
    ------
    ValueError
        Bad shapes / dtypes / scalars, candidates out of range or repeated, NaN / +inf values, or a
        row where q is zero everywhere (one device sync to check the kernel's per-row status).
    """
    mode, beta, temperature = check_tilted_inputs(logits, potential, candidates, beta, temperature)
    b, v = logits.shape
    block_v = tile_size(v, max_block=max_block, what="V (vocabulary)")
    device = logits.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()

    bad_candidates = None
    if mode == "none":
        pot, cand, k = logits, logits, 0  # placeholders, never read (PHI == 0)
    elif mode == "dense":
        pot = potential if potential.stride(-1) == 1 else potential.contiguous()
        cand, k = logits, 0
    else:
        order, bad_candidates = _bad_candidate_rows(candidates, v)
        k = candidates.shape[1]
        cand = order.values.to(torch.int32)  # (B, k) ascending; V < 2**31 was checked
        pot = potential.gather(1, order.indices)  # (B, k) in the same order
    block_k = tile_size(max(k, 1), max_block=MAX_BLOCK_K, what="k (candidates)")

    seed_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=seed_device, dtype=torch.int64).to(device)
    tokens = torch.empty(b, dtype=torch.int64, device=device)  # (B,)
    log_q = torch.empty(b, dtype=torch.float32, device=device)  # (B,)
    log_norm = torch.empty(b, dtype=torch.float32, device=device)  # (B,)
    status = torch.empty(b, dtype=torch.int32, device=device)  # (B,)
    with on_device(logits):
        _tilted_kernel[(b,)](
            logits, pot, cand, seed, tokens, log_q, log_norm, status,
            v, k, logits.stride(0), pot.stride(0), cand.stride(0), 1.0 / temperature, 1.0 / beta,
            PHI={"none": 0, "dense": 1, "sparse": 2}[mode], BLOCK_V=block_v, BLOCK_K=block_k,
            num_warps=num_warps(block_v), enable_fp_fusion=True,
        )  # fmt: skip
    _raise_for_rows(status, bad_candidates)
    return TiltedSample(tokens, log_q, log_norm)
