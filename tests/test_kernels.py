"""Triton kernels against their torch references (issue 5).

Run on the CPU with ``TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -q`` (set here too,
before anything imports Triton: the flag is read when the kernels are decorated). On a GPU machine,
``TRITON_INTERPRET=0`` runs the same tests on CUDA tensors. Without Triton the kernel tests skip
and the reference tests run.

Tolerances: normalisation is computed in fp32 for fp32 / bf16 input (bf16 values are exact in fp32),
so normalised log-weights and log-mean match the reference to atol 1e-5, rtol 1e-6, and the ESS to
rtol 1e-5; fp64 input to 1e-12. Resampling must return the reference's ancestors exactly, except
that a point within 1e-6 of a CDF step may land on the other side (the reference rounds the
normalised log-weights to fp32). Tilted sampling: log_q and log_norm to atol 1e-5 for fp32 and bf16
logits; the draws are tested against the exact q by a chi-square test at level 1e-3.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import posterior.kernels as K  # noqa: E402
from posterior.diagnostics.weights import log_weight_stats  # noqa: E402
from posterior.errors import DegenerateWeightsError  # noqa: E402
from posterior.kernels._common import INTERPRET, tile_size  # noqa: E402
from posterior.kernels.normalize import normalize_triton  # noqa: E402
from posterior.kernels.resample import resample_triton  # noqa: E402
from posterior.kernels.tilted import tilted_log_probs, tilted_sample_triton  # noqa: E402
from posterior.kernels.schemes import _stratified_points, _uniform  # noqa: E402

NEG_INF = float("-inf")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"


@pytest.fixture
def kernels():
    """Skip unless the Triton kernels can run here (interpreter on CPU, or a GPU)."""
    pytest.importorskip("triton")
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("posterior.kernels was imported before TRITON_INTERPRET=1 was set; set it in the environment")


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _log_weights(shape, dtype, seed, *, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------------------------
# Block-size helper and dispatch.


def test_tile_size_is_a_capped_power_of_two_and_errors_name_the_value():
    assert tile_size(1, max_block=1024) == 16
    assert tile_size(1000, max_block=1024) == 1024
    assert tile_size(5000, max_block=1024) == 1024
    with pytest.raises(ValueError, match="max_block=1000"):
        tile_size(10, max_block=1000)
    with pytest.raises(ValueError, match="max_block=32768"):
        tile_size(10, max_block=2**15)
    with pytest.raises(ValueError, match=r"V \(vocabulary\)=2147483648"):
        tile_size(2**31, max_block=1024, what="V (vocabulary)")


def test_bad_backend_and_non_tensors_raise():
    with pytest.raises(ValueError, match="backend='cuda'"):
        K.normalize_log_weights(torch.zeros(2, 3), backend="cuda")
    with pytest.raises(ValueError, match="log_weights must be a torch.Tensor"):
        K.normalize_log_weights([0.0, 1.0])
    with pytest.raises(ValueError, match="dtype torch.int64"):
        K.resample(torch.zeros(2, 3, dtype=torch.long), 3, "systematic")


def test_import_and_fallback_without_triton():
    """``import posterior.kernels`` works where Triton is not installed, and falls back to torch."""
    code = """
import sys
class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked for this test")
sys.meta_path.insert(0, _NoTriton())
import torch
import posterior.kernels as K
assert not K.HAS_TRITON
lw = torch.randn(3, 5)
assert torch.equal(K.normalize_log_weights(lw).ess, K.normalize_reference(lw).ess)
a = K.resample(lw, 4, "systematic", generator=torch.Generator().manual_seed(0))
b = K.resample_reference(lw, 4, "systematic", generator=torch.Generator().manual_seed(0))
assert torch.equal(a, b)
assert K.tilted_sample(torch.randn(2, 7), beta=0.5).tokens.shape == (2,)
try:
    K.tilted_sample(torch.randn(2, 7), backend="triton")
except ValueError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("backend='triton' without triton did not raise")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# Normalisation: exact answers, then the kernel against the reference.


def test_reference_ess_exact_answers():
    one = torch.tensor([[NEG_INF, 2.5, NEG_INF, NEG_INF]])
    assert log_weight_stats(one).ess.item() == 1.0
    for n in (1, 7, 1000):
        # exp(-logsumexp(2 log(1/N))) rounds: N to 1 ulp.
        assert K.normalize_log_weights(torch.zeros(1, n), backend="torch").ess.item() == pytest.approx(n, rel=1e-6)


def test_kernel_ess_exact_answers(kernels):
    """ESS of one finite weight is exactly 1 and of uniform weights exactly N (s = N, s2 = N in fp32)."""
    one = torch.full((1, 1000), NEG_INF, device=DEVICE)
    one[0, 777] = -3.0
    assert normalize_triton(one, max_block=256).ess.item() == 1.0
    for n in (1, 7, 1000):
        ess = normalize_triton(torch.full((2, n), 0.25, device=DEVICE), max_block=256).ess
        assert ess.tolist() == [float(n)] * 2


NORMALIZE_SHAPES = [
    ((1, 1), 4096),
    ((1, 7), 4096),
    ((3, 100), 4096),
    ((4, 1000), 256),  # four tiles per row
    ((2, 3, 37), 16),  # leading batch dims, three tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,max_block", NORMALIZE_SHAPES)
def test_normalize_kernel_matches_reference(kernels, shape, max_block, dtype):
    lw = _log_weights(shape, dtype, seed=sum(shape))
    flat = lw.reshape(-1, shape[-1])
    if shape[-1] > 1:
        flat[0, : shape[-1] // 2] = NEG_INF  # some zero weights
    if flat.shape[0] > 2:
        flat[1] = NEG_INF  # a degenerate row
    got, want = normalize_triton(lw, max_block=max_block), log_weight_stats(lw)
    tight = dtype == torch.float64
    for name in ("log_weights", "log_mean"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert not g.isnan().any()
        torch.testing.assert_close(g, w, atol=1e-12 if tight else 1e-5, rtol=1e-12 if tight else 1e-6, msg=name)
    torch.testing.assert_close(got.ess, want.ess, atol=0.0, rtol=1e-12 if tight else 1e-5)
    assert torch.equal(got.degenerate, want.degenerate)


def test_normalize_kernel_max_growing_across_tiles(kernels):
    """Weights increasing along the row: every tile raises the running max, so the sums rescale each time."""
    lw = torch.linspace(-800.0, 50.0, 1000, device=DEVICE)[None, :]  # exp overflows fp32 without the max shift
    got, want = normalize_triton(lw, max_block=64), log_weight_stats(lw)
    torch.testing.assert_close(got.log_weights, want.log_weights, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(got.log_mean, want.log_mean, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(got.ess, want.ess, atol=0.0, rtol=1e-5)


@pytest.mark.parametrize("n,max_block", [(1, 16), (5, 16), (1000, 256)])
def test_normalize_kernel_all_neg_inf_rows(kernels, n, max_block):
    lw = torch.full((2, n), NEG_INF, device=DEVICE)
    lw[1, 0] = 0.0  # the second row has a single finite weight
    got = normalize_triton(lw, max_block=max_block)
    assert got.degenerate.tolist() == [True, False]
    assert got.ess.tolist() == [0.0, 1.0]
    assert got.log_mean[0].item() == NEG_INF and got.log_mean[1].item() == pytest.approx(-math.log(n))
    assert got.log_weights[0].isneginf().all() and got.log_weights[1, 0].item() == 0.0
    assert not got.log_weights.isnan().any()


# ------------------------------------------------------------------------------------------------
# Resampling: the kernel returns the reference's ancestors.


def _points(scheme, batch, m, seed):
    """The reference's points u_m for ``seed`` (re-drawn from a fresh generator)."""
    like = torch.empty(0, dtype=torch.float64, device=DEVICE)
    if scheme == "multinomial":
        return _uniform((*batch, m), like, _gen(seed))
    return _stratified_points(batch, m, like, _gen(seed), one_per_row=scheme == "systematic")


def assert_same_ancestors(got, want, log_weights, scheme, seed):
    """Equal, except at float ties: where they differ, the point lies within 1e-6 of the exact CDF
    step at the smaller index, and such ties are rare."""
    assert got.shape == want.shape and got.dtype == want.dtype == torch.int64
    differ = got != want
    if not differ.any():
        return
    n, m = log_weights.shape[-1], got.shape[-1]
    assert differ.float().mean().item() < 1e-3, f"{int(differ.sum())} of {differ.numel()} ancestors differ"
    w = torch.softmax(log_weights.double(), dim=-1)  # (..., N) exact enough in fp64
    cdf = torch.cumsum(w, -1)
    u = _points(scheme, log_weights.shape[:-1], m, seed)
    step = cdf.gather(-1, torch.minimum(got, want).clamp(max=n - 1))
    gap = (step - u)[differ].abs()
    assert gap.max().item() < 1e-6, f"ancestors differ away from a CDF step (gap {gap.max().item():.3g})"


RESAMPLE_SHAPES = [
    ((1, 1), 1, 4096),
    ((1, 7), 5, 4096),
    ((3, 1000), 1000, 256),  # four tiles per row; M != power of two
    ((2, 3, 50), 64, 16),  # leading batch dims, M > N
]


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "multinomial"])
@pytest.mark.parametrize("shape,m,max_block", RESAMPLE_SHAPES)
def test_resample_kernel_equals_reference(kernels, scheme, shape, m, max_block):
    lw = _log_weights(shape, torch.float32, seed=m + shape[-1])
    flat = lw.reshape(-1, shape[-1])
    if shape[-1] > 4:
        flat[0, ::3] = NEG_INF  # zero-weight particles, first one included
        flat[-1, -1] = NEG_INF  # and a last one
    seed = 1234 + m
    got = resample_triton(lw, m, scheme, generator=_gen(seed), max_block=max_block)
    want = K.resample_reference(lw, m, scheme, generator=_gen(seed))
    assert_same_ancestors(got, want, lw, scheme, seed)
    assert ((got >= 0) & (got < shape[-1])).all()
    zero = lw.isneginf().reshape(-1, shape[-1])
    assert not zero.gather(-1, got.reshape(zero.shape[0], -1)).any(), "a zero-weight particle was chosen"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scheme", ["systematic", "multinomial"])
def test_resample_kernel_equals_reference_other_dtypes(kernels, scheme, dtype):
    lw = _log_weights((3, 300), dtype, seed=7)
    got = resample_triton(lw, 300, scheme, generator=_gen(5), max_block=128)
    want = K.resample_reference(lw, 300, scheme, generator=_gen(5))
    if dtype == torch.float64:
        assert torch.equal(got, want)  # both CDFs are fp64 from fp64 input: no ties at 1e-7
    else:
        assert_same_ancestors(got, want, lw, scheme, 5)


def test_resample_kernel_advances_the_generator_like_the_reference(kernels):
    lw = _log_weights((2, 40), torch.float32, seed=3)
    for scheme in ("systematic", "stratified", "multinomial"):
        g1, g2 = _gen(9), _gen(9)
        resample_triton(lw, 30, scheme, generator=g1)
        K.resample_reference(lw, 30, scheme, generator=g2)
        assert torch.equal(g1.get_state(), g2.get_state()), scheme


def test_resample_kernel_systematic_offspring_counts_are_floor_or_ceil_of_m_w(kernels):
    """Systematic resampling gives particle i either floor(M w_i) or ceil(M w_i) offspring."""
    lw = _log_weights((4, 50), torch.float32, seed=11, scale=1.5)
    m = 77
    anc = resample_triton(lw, m, "systematic", generator=_gen(0), max_block=16)
    counts = torch.zeros(4, 50, dtype=torch.long, device=DEVICE).scatter_add_(1, anc, torch.ones_like(anc))
    mw = m * torch.softmax(lw.double(), -1)
    assert ((counts >= torch.floor(mw - 1e-9)) & (counts <= torch.ceil(mw + 1e-9))).all()
    assert (anc[:, 1:] >= anc[:, :-1]).all()  # sorted points give sorted ancestors


def test_resample_kernel_rejects_what_the_reference_rejects(kernels):
    lw = _log_weights((3, 20), torch.float32, seed=1)
    lw[1] = NEG_INF
    for fn in (resample_triton, K.resample_reference):
        with pytest.raises(DegenerateWeightsError, match=r"row\(s\) \[1\]"):
            fn(lw, 5, "systematic", generator=_gen(0))
    lw[1, 3] = float("nan")
    for fn in (resample_triton, K.resample_reference):
        with pytest.raises(ValueError, match="non-finite value nan at index"):
            fn(lw, 5, "stratified", generator=_gen(0))


def test_resample_dispatch_scheme_and_num_samples(kernels):
    lw = _log_weights((2, 9), torch.float32, seed=2)
    with pytest.raises(ValueError, match="'residual' has no Triton kernel"):
        K.resample(lw, 4, "residual", backend="triton")
    want = K.resample_reference(lw, 4, "residual", generator=_gen(0))
    assert torch.equal(K.resample(lw, 4, "residual", generator=_gen(0)), want)  # auto falls back
    with pytest.raises(ValueError, match="unknown resampling scheme 'sytematic'"):
        K.resample(lw, 4, "sytematic")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_samples="):
            K.resample(lw, bad, "systematic", backend="triton")
    got = K.resample(lw, 6, "stratified", generator=_gen(1), backend="triton")
    assert torch.equal(got, K.resample(lw, 6, "stratified", generator=_gen(1), backend="torch"))


# ------------------------------------------------------------------------------------------------
# Tilted sampling: exact answers of the reference, then the kernel's log q / log_norm and its draws.


def _tilted_inputs(b, v, mode, dtype, seed, k=6):
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(b, v, generator=g)).to(dtype).to(DEVICE)
    if mode == "none":
        return logits, {}
    if mode == "dense":
        return logits, {"potential": (3.0 * torch.randn(b, v, generator=g)).to(dtype).to(DEVICE)}
    k = min(k, v)
    cand = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b)]).to(DEVICE)
    return logits, {"potential": (3.0 * torch.randn(b, k, generator=g)).to(dtype).to(DEVICE), "candidates": cand}


def test_tilted_reference_exact_on_three_tokens():
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    phi = torch.tensor([[1.0, -2.0, 0.5]])
    beta, temp = 0.5, 2.0
    p = torch.softmax(logits.double() / temp, -1)
    tilted = p * torch.exp(phi.double() / beta)
    log_q, log_norm = tilted_log_probs(logits, potential=phi, beta=beta, temperature=temp)
    torch.testing.assert_close(log_q.double(), torch.log(tilted / tilted.sum()), atol=1e-6, rtol=0)
    assert log_norm.item() == pytest.approx(math.log(tilted.sum().item()), abs=1e-6)
    # Sparse: only token 2 tilted.
    log_q, log_norm = tilted_log_probs(
        logits, potential=torch.tensor([[0.5]]), candidates=torch.tensor([[2]]), beta=beta, temperature=temp
    )
    tilted = p * torch.exp(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(log_q.double(), torch.log(tilted / tilted.sum()), atol=1e-6, rtol=0)
    assert log_norm.item() == pytest.approx(math.log(tilted.sum().item()), abs=1e-6)


def test_tilted_reference_log_norm_is_zero_without_potential():
    logits = 3.0 * torch.randn(4, 50)
    out = K.tilted_sample(logits, generator=torch.Generator().manual_seed(0), backend="torch")
    torch.testing.assert_close(out.log_norm, torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.log_q, torch.log_softmax(logits, -1).gather(1, out.tokens[:, None])[:, 0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": 0.0}, "beta=0.0"),
        ({"beta": -1.0}, "beta=-1.0"),
        ({"beta": float("nan")}, "beta=nan"),
        ({"beta": float("inf")}, "beta=inf"),
        ({"beta": "high"}, "beta='high'"),
        ({"beta": 1e-39}, "beta=1e-39 is too small"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"potential": torch.zeros(2, 5)}, r"dense potential has shape \(2, 5\)"),
        ({"potential": torch.zeros(2, 3), "candidates": torch.zeros(2, 3, dtype=torch.int32)}, "int64"),
        ({"potential": torch.zeros(2, 3), "candidates": torch.zeros(2, 4, dtype=torch.long)}, "must both be"),
        ({"candidates": torch.zeros(2, 3, dtype=torch.long)}, "without a potential"),
    ],
)
def test_tilted_rejects_bad_arguments(kwargs, match):
    for backend in ("torch", "auto"):
        with pytest.raises(ValueError, match=match):
            K.tilted_sample(torch.zeros(2, 11), backend=backend, **kwargs)


def test_tilted_rejects_bad_logits_shapes_and_dtypes():
    with pytest.raises(ValueError, match="expected 2 dimensions"):
        K.tilted_sample(torch.zeros(11))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        K.tilted_sample(torch.zeros(2, 11, dtype=torch.long))


def _bad_value_cases():
    nan_logits = torch.zeros(3, 40)
    nan_logits[2, 7] = float("nan")
    all_inf = torch.zeros(3, 40)
    all_inf[1] = NEG_INF
    forbidden = torch.zeros(3, 40)  # the potential forbids every token
    forbidden_phi = torch.zeros(3, 40)
    forbidden_phi[0] = NEG_INF
    out_of_range = {"potential": torch.zeros(3, 2), "candidates": torch.tensor([[0, 1], [2, 40], [3, 4]])}
    repeated = {"potential": torch.zeros(3, 2), "candidates": torch.tensor([[0, 1], [2, 3], [4, 4]])}
    return [
        (nan_logits, {}, r"NaN or \+inf in logits or potential .* in row\(s\) \[2\]"),
        (all_inf, {}, r"q is zero for every token .* in row\(s\) \[1\]"),
        (forbidden, {"potential": forbidden_phi}, r"q is zero for every token .* in row\(s\) \[0\]"),
        (torch.zeros(3, 40), out_of_range, r"candidates out of \[0, V\) or repeated in row\(s\) \[1\]"),
        (torch.zeros(3, 40), repeated, r"candidates out of \[0, V\) or repeated in row\(s\) \[2\]"),
    ]


def test_tilted_reference_rejects_phi_over_beta_overflow():
    """A tiny beta makes phi / beta overflow to +inf: an error naming the row, not a NaN sample."""
    phi = torch.zeros(2, 10)
    phi[1, 3] = 100.0
    with pytest.raises(ValueError, match=r"\(or in phi / beta\) in row\(s\) \[1\]"):
        K.tilted_sample(torch.zeros(2, 10), potential=phi, beta=1e-37, backend="torch")


@pytest.mark.parametrize("case", range(5))
def test_tilted_reference_rejects_bad_values(case):
    logits, kwargs, match = _bad_value_cases()[case]
    with pytest.raises(ValueError, match=match):
        K.tilted_sample(logits, backend="torch", **kwargs)


@pytest.mark.parametrize("case", range(5))
def test_tilted_kernel_rejects_bad_values(kernels, case):
    logits, kwargs, match = _bad_value_cases()[case]
    with pytest.raises(ValueError, match=match):
        tilted_sample_triton(logits.to(DEVICE), max_block=16, **{k: v.to(DEVICE) for k, v in kwargs.items()})


TILTED_SHAPES = [
    ((1, 1), 4096),  # one row, one token
    ((3, 37), 4096),  # non-power of two
    ((2, 1000), 4096),
    ((2, 3000), 1024),  # V above one block: three tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["none", "dense", "sparse"])
@pytest.mark.parametrize("shape,max_block", TILTED_SHAPES)
def test_tilted_kernel_log_q_and_log_norm_match_reference(kernels, shape, max_block, mode, dtype):
    logits, kwargs = _tilted_inputs(*shape, mode, dtype, seed=shape[1])
    if shape[1] > 1:
        logits[0, 0] = NEG_INF  # a banned token
    beta, temp = 0.7, 1.3
    out = tilted_sample_triton(logits, beta=beta, temperature=temp, generator=_gen(0), max_block=max_block, **kwargs)
    log_q, log_norm = tilted_log_probs(logits, beta=beta, temperature=temp, **kwargs)
    assert out.tokens.dtype == torch.int64 and out.tokens.shape == (shape[0],)
    assert ((out.tokens >= 0) & (out.tokens < shape[1])).all()
    if shape[1] > 1:
        assert (out.tokens[0] != 0).item(), "a token with p = 0 was drawn"
    torch.testing.assert_close(out.log_q, log_q.gather(1, out.tokens[:, None])[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.log_norm, log_norm, atol=1e-5, rtol=0)
    if mode == "none":
        assert (out.log_norm == 0).all()  # the same sums for y and z


def test_tilted_kernel_candidates_at_tile_edges(kernels):
    """Sparse candidates at the first / last token of tiles and of the vocabulary, unsorted, several per tile."""
    v = 70
    logits, _ = _tilted_inputs(2, v, "none", torch.float32, seed=4)
    cand = torch.tensor([[69, 0, 15, 16, 31, 32, 33], [47, 48, 1, 2, 63, 64, 5]], device=DEVICE)
    pot = torch.linspace(-4.0, 4.0, 14, device=DEVICE).reshape(2, 7)
    out = tilted_sample_triton(logits, potential=pot, candidates=cand, beta=0.5, generator=_gen(1), max_block=16)
    log_q, log_norm = tilted_log_probs(logits, potential=pot, candidates=cand, beta=0.5)
    torch.testing.assert_close(out.log_norm, log_norm, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.log_q, log_q.gather(1, out.tokens[:, None])[:, 0], atol=1e-5, rtol=0)


def test_tilted_kernel_is_reproducible_and_independent_of_the_tile_size(kernels):
    logits, kwargs = _tilted_inputs(8, 200, "dense", torch.float32, seed=2)
    a = tilted_sample_triton(logits, generator=_gen(3), max_block=64, **kwargs)
    b = tilted_sample_triton(logits, generator=_gen(3), max_block=256, **kwargs)
    c = tilted_sample_triton(logits, generator=_gen(4), max_block=256, **kwargs)
    assert torch.equal(a.tokens, b.tokens)  # token v always gets Philox output (v // 4, v % 4)
    assert not torch.equal(b.tokens, c.tokens)


def _chi_square_pvalue_ok(tokens, q, level=1e-3):
    """Pearson chi-square of the draws against q, pooling tokens with expected count < 5."""
    from scipy.stats import chi2

    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=q.numel()).double()
    expected = n * q.cpu().double()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    df = int(keep.sum()) - 1
    return stat, chi2.ppf(1 - level, df)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_tilted_kernel_draws_follow_q(kernels, mode):
    """n rows of one distribution (independent noise per row): token counts against the exact q.

    The tilt moves most of the mass to tokens that are unlikely under p, and V = 20 spans two tiles
    of 16, so ignoring phi or mishandling the cross-tile argmax fails the test by a wide margin.
    """
    n, v = 200, 20
    logits = torch.linspace(2.0, -2.0, v, device=DEVICE)[None, :].expand(n, v).contiguous()
    if mode == "dense":
        phi = torch.zeros(v, device=DEVICE)
        phi[[3, 11, 17, 19]] = torch.tensor([1.0, 3.0, 4.0, 3.5], device=DEVICE)
        kwargs = {"potential": phi[None, :].expand(n, v).contiguous()}
    else:
        cand = torch.tensor([17, 3, 11, 0, 19], device=DEVICE)
        pot = torch.tensor([4.0, 1.0, 3.0, -3.0, 3.5], device=DEVICE)
        kwargs = {"potential": pot[None, :].expand(n, 5).contiguous(), "candidates": cand[None, :].expand(n, 5).contiguous()}
    out = tilted_sample_triton(logits, beta=0.8, generator=_gen(2024), max_block=16, **kwargs)
    log_q, _ = tilted_log_probs(logits[:1], beta=0.8, **{k: t[:1] for k, t in kwargs.items()})
    q = log_q[0].double().exp()
    assert q[:10].sum() < 0.4 and q[16:].sum() > 0.3  # the tilt matters: p puts 0.89 on the first ten tokens
    stat, threshold = _chi_square_pvalue_ok(out.tokens, q)
    assert stat < threshold, f"chi-square {stat:.1f} >= {threshold:.1f}: draws do not follow q"
    torch.testing.assert_close(out.log_q, log_q[0][out.tokens], atol=1e-5, rtol=0)


def test_tilted_dispatch_auto_on_cpu_is_the_cpu_backend_and_torch_is_the_reference():
    """On CPU tensors "auto" is tilted_sample_cpu (float64 CDF inversion) and "torch" the literal
    reference (multinomial): same generator, same tokens as each."""
    logits = torch.randn(5, 30)
    a = K.tilted_sample(logits, beta=2.0, generator=torch.Generator().manual_seed(8), backend="auto")
    c = K.tilted_sample_cpu(logits, beta=2.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, c.tokens) and a.log_q.dtype == torch.float64
    t = K.tilted_sample(logits, beta=2.0, generator=torch.Generator().manual_seed(8), backend="torch")
    b = K.tilted_sample_reference(logits, beta=2.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(t.tokens, b.tokens)


def test_kernels_package_does_not_import_the_samplers():
    """kernels/ is self-contained: no module of it imports posterior.samplers (the samplers import
    the kernels, never the other way round)."""
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("posterior.samplers") for n in names), (path.name, names)


def test_cpu_tilted_sampler_agrees_with_the_kernels_reference_and_draws_from_q():
    """tilted_sample_cpu (the CPU backend of tilted_sample) has the semantics of the reference: the same log q and
    log_norm as the reference's materialised q, and token frequencies that match q (4 sigma)."""
    g = torch.Generator().manual_seed(1)
    V, beta, n = 9, 0.5, 20_000
    logp = torch.log_softmax(torch.randn(1, V, generator=g), -1).expand(n, V)
    cand = torch.tensor([[0, 3, 7]]).expand(n, 3)
    pot = torch.tensor([[1.0, -math.inf, -0.5]]).expand(n, 3)
    s = K.tilted_sample_cpu(logp, potential=pot, candidates=cand, beta=beta, generator=g)
    ref_log_q, ref_log_norm = K.tilted_log_probs(logp[:2], potential=pot[:2], candidates=cand[:2], beta=beta)
    q = ref_log_q[0].double().exp()
    assert torch.allclose(s.log_q, ref_log_q[0].double()[s.tokens], atol=1e-5)
    assert torch.allclose(s.log_norm, ref_log_norm[0].double().expand(n), atol=1e-5)
    assert (s.tokens != 3).all()  # phi = -inf: never proposed
    freq = torch.bincount(s.tokens, minlength=V).double() / n
    assert torch.all((freq - q).abs() <= 4 * (q * (1 - q) / n).sqrt() + 1e-12)
    boot = K.tilted_sample_cpu(logp, generator=torch.Generator().manual_seed(2))  # no potential: q = pi0
    assert torch.allclose(boot.log_norm, torch.zeros(n, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(boot.log_q, logp[0].double()[boot.tokens], atol=1e-6)


def test_bench_script_smoke(kernels, capsys):
    """bench/bench_kernels.py runs every case once on tiny CPU shapes (checks the script, times nothing)."""
    if DEVICE != "cpu":
        pytest.skip("the smoke run is for the CPU interpreter")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "tilted bf16 phi=sparse" in out and "index_select" in out


def test_checkout_root_does_not_shadow_huggingface_kernels():
    """Regression (issue 25.1): Python run from the checkout root found this project's kernels/
    folder as the top-level ``kernels`` module, so transformers >= 5.20 (which imports Hugging Face's
    ``kernels`` package) failed to load any Llama. From the root, ``import kernels`` is the installed
    package (or a clear ImportError where none is installed), a Llama builds and runs, and
    ``posterior.kernels`` is still this folder."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib.util, os, sys\n"
        "root = os.getcwd()\n"
        "import posterior.kernels as K\n"
        "assert os.path.dirname(K.__file__) == os.path.join(root, 'kernels'), K.__file__\n"
        "if importlib.util.find_spec('kernels') is not None:\n"
        "    try:\n"
        "        import kernels\n"
        "    except ImportError as e:\n"
        "        assert 'posterior.kernels' in str(e), e\n"
        "    else:\n"
        "        assert not os.path.abspath(kernels.__file__).startswith(os.path.join(root, 'kernels')), kernels.__file__\n"
        "import torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=2)\n"
        "print(tuple(LlamaForCausalLM(cfg)(torch.tensor([[1, 2, 3]])).logits.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("(1, 3, 16)")
