"""Regression tests for issue 11: numbers never silently wrong, inputs validated at the boundary,
output a person can read. Each test is named after what broke."""

import math
import time

import numpy as np
import pytest
import torch

import posterior as pst
from posterior.diagnostics import log_weight_stats, qrs_estimates
from posterior.exact import exact_posterior
from posterior.rewards import Callable, Contains
from posterior.testing import markov_prior, tiny_hf_prior, two_token_prior

T = 3  # two_token_prior at max_new_tokens=3: 15 continuations; only "aaa" has three a's
P_AAA = 0.5**3  # pi0("aaa")


def count_a(scale: float, *, prefixes: bool = False):
    return Callable(lambda ts: [scale * t.count("a") for t in ts], name=f"{scale:g}*count_a", accepts_prefixes=prefixes)


def const(c: float, *, prefixes: bool = False):
    return Callable(lambda ts: [c] * len(ts), name=f"const{c:g}", accepts_prefixes=prefixes)


# --------------------------------------------------------------------------------------------------
# Numbers at large |r/beta|
# --------------------------------------------------------------------------------------------------
def test_normalised_weights_keep_log_n_when_log_weights_are_1e17():
    """logsumexp([1e17] * 3) == 1e17 in float64: subtracting it left three weights of 1 each."""
    lw = torch.tensor([[1e17, 1e17, 1e17, -math.inf]], dtype=torch.float64)
    s = log_weight_stats(lw)
    assert s.log_weights.exp()[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0], rel=1e-15)
    assert s.ess.item() == pytest.approx(3.0, rel=1e-15)
    assert s.log_mean.item() == 1e17  # 1e17 + log(3/4) rounds to 1e17


SCALES = [(1e6, 1e-3), (1.0, 1e-17), (1.0, 1e-300)]  # (reward scale, beta): |r/beta| from 1e9 to 3e300


@pytest.mark.parametrize("scale, beta", SCALES)
@pytest.mark.parametrize("method, n, kw", [
    ("is", 20_000, {}),
    ("rejection", 1_000, {"reward_upper_bound": "3s"}),
    ("qrs", 1_000, {}),
])
def test_weights_ess_log_z_and_kl_stay_exact_at_large_r_over_beta(method, n, kw, scale, beta):
    """Rewards 3·scale on "aaa" and at least scale less elsewhere: pi* is the point mass on
    "aaa", KL(pi*||pi0) = -log pi0("aaa") = log 8 and log Z = 3·scale/beta + log(1/8). The KL was
    E[r]/beta - log Z from float32 weights: off by hundreds at 1e9, by 1e18 at 1e17."""
    kw = {k: 3 * scale if v == "3s" else v for k, v in kw.items()}
    post = pst.Posterior(two_token_prior(), count_a(scale), beta=beta)
    ex = exact_posterior(post.prior, post.reward, beta, T)
    assert ex.kl == pytest.approx(math.log(8), abs=1e-6)  # the prior is float32
    res = post.sample(n=n, method=method, max_new_tokens=T, seed=3, **kw)
    live = torch.isfinite(res.log_weights[0]) & (res.log_weights[0].double().exp() > 0)
    w = res.log_weights[0][live].double().exp()
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert all(t == "aaa" for t, keep in zip(res.texts[0], live.tolist()) if keep and method == "is")
    # Sampling error of the estimates: the "aaa" fraction k/N of D draws has sd sqrt(7/D) in log.
    D = n if method == "is" else int(res.info["draws"][0])
    tol = 4 * math.sqrt((1 - P_AAA) / (D * P_AAA))
    assert res.kl().dtype == torch.float64 and res.log_Z.dtype == torch.float64
    assert res.kl().item() == pytest.approx(math.log(8), abs=tol)
    assert res.kl().item() >= 0
    exact_rel = math.log(P_AAA)  # log Z - 3 scale / beta
    got_rel = res.log_Z.item() - 3 * scale / beta
    assert abs(got_rel - exact_rel) <= tol + 4 * math.ulp(3 * scale / beta)
    if method == "is":
        k = int(live.sum())
        assert res.ess.item() == pytest.approx(k, rel=1e-6)
        assert res.kl().item() == pytest.approx(math.log(n / k), abs=1e-9)  # exactly log N - H(w̄)


def test_smc_weights_log_z_and_kl_stay_exact_at_r_over_beta_1e9():
    post = pst.Posterior(two_token_prior(), count_a(1e6, prefixes=True), beta=1e-3)
    res = post.sample(n=2000, method="smc", max_new_tokens=T, seed=0)
    w = res.log_weights[0].double().exp()
    assert sum(wi for wi, t in zip(w.tolist(), res.texts[0]) if t == "aaa") == pytest.approx(1.0, abs=1e-6)  # float32 weights
    assert torch.logsumexp(res.log_weights.double(), -1).item() == pytest.approx(0.0, abs=1e-6)
    # Each of the 3 steps keeps the "a" particles (fraction 1/2): sd of log(k/N) ~ sqrt(1/N) per step.
    tol = 4 * math.sqrt(3 / 2000)
    assert res.kl().item() == pytest.approx(math.log(8), abs=tol)
    assert res.log_Z.item() - 3e9 == pytest.approx(math.log(P_AAA), abs=tol + 1e-6)


@pytest.mark.parametrize("method", ["smc", "mh"])
def test_samplers_that_add_log_prior_to_r_over_beta_refuse_unresolvable_scales(method):
    """SMC and MH form log pi0 + r/beta: at |r/beta| = 1e17 float64 steps are 16 nats."""
    post = pst.Posterior(two_token_prior(), count_a(1.0, prefixes=True), beta=1e-17)
    with pytest.raises(ValueError, match=rf"r/beta overflows float64 for method '{method}'"):
        post.sample(n=8, method=method, max_new_tokens=T, seed=0)


@pytest.mark.parametrize("method, kw", [("is", {}), ("rejection", {"reward_upper_bound": 3.0}), ("qrs", {}),
                                        ("smc", {})])
def test_r_over_beta_beyond_float64_raises_naming_the_overflow(method, kw):
    post = pst.Posterior(two_token_prior(), count_a(1.0, prefixes=True), beta=1e-320)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="r/beta overflows float64"):
        post.sample(n=8, method=method, max_new_tokens=T, seed=0, **kw)
    assert time.perf_counter() - t0 < 20  # an error, not a loop to max_draws


@pytest.mark.parametrize("c, beta", [(0.0, 1.0), (1e6, 1e-3), (-3.0, 0.5), (2.0, 1e-9)])
@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("method", ["is", "rejection", "qrs", "smc"])
def test_constant_reward_gives_kl_zero_for_every_method_and_n(method, n, c, beta):
    """pi* = pi0 when r is constant: KL(pi*||pi0) = 0 and log Z = c/beta exactly. SMC with the
    reward as its own twist (the reward accepts prefixes)."""
    kw = {"reward_upper_bound": c} if method == "rejection" else {}
    post = pst.Posterior(markov_prior(), const(c, prefixes=True), beta=beta)
    res = post.sample(n=n, method=method, max_new_tokens=T, seed=n, **kw)
    assert res.kl().item() == pytest.approx(0.0, abs=1e-12)
    assert res.log_Z.item() == pytest.approx(c / beta, rel=1e-15, abs=1e-12)
    assert res.ess.item() == pytest.approx(n, rel=1e-6)


def test_constant_reward_gives_kl_zero_for_smc_without_a_twist():
    post = pst.Posterior(markov_prior(), const(1e6), beta=1e-3)
    res = post.sample(n=64, method="smc", max_new_tokens=T, seed=7)
    assert res.kl().item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["mh", "bon", "soft_bon"])
def test_constant_reward_methods_without_log_z_report_no_kl(method):
    res = pst.Posterior(markov_prior(), const(1e6), beta=1e-3).sample(n=4, method=method, max_new_tokens=T, seed=0)
    assert res.kl() is None and res.log_Z is None


def test_every_log_z_is_float64():
    """QRS stored its log Z as float32 (torch.tensor of Python floats)."""
    post = pst.Posterior(two_token_prior(), count_a(1.0, prefixes=True), beta=0.5)
    for method, kw in [("is", {}), ("smc", {}), ("rejection", {"reward_upper_bound": 3.0}), ("qrs", {})]:
        res = post.sample(n=16, method=method, max_new_tokens=T, seed=0, **kw)
        assert res.log_Z.dtype == torch.float64, method
        assert res.kl().dtype == torch.float64, method
    for key in ("acceptance_rate", "tv_estimate", "kl_estimate", "log_bound"):
        assert res.info[key].dtype == torch.float64, key


def test_qrs_kl_and_tv_estimates_are_never_negative():
    """sum p log(p/p_B) over the same atoms is >= 0, but its float64 rounding was not."""
    g = torch.Generator().manual_seed(0)
    negative_before = 0
    for _ in range(300):
        N = int(torch.randint(2, 50, (1,), generator=g))
        lw = torch.randn(N, generator=g, dtype=torch.float64) * 10 ** float(torch.empty(1).uniform_(-14, 1, generator=g))
        B = float(lw.max()) - abs(float(torch.randn(1, generator=g, dtype=torch.float64))) * 1e-9
        est = qrs_estimates(lw, B)
        assert est["kl"] >= 0 and est["tv"] >= 0
        a, b = log_weight_stats(lw), log_weight_stats(lw.clamp(max=B))
        p = a.log_weights.exp()
        negative_before += float((p * (a.log_weights - b.log_weights)).sum()) < 0
    assert negative_before > 0  # the unclamped sum does go below 0 on these inputs


def test_qrs_estimates_match_the_exact_divergences():
    log_w = torch.tensor([0.0, 1.0, 2.0, -math.inf], dtype=torch.float64)
    est = qrs_estimates(log_w, 1.0)
    p = torch.tensor([1, math.e, math.e**2, 0.0], dtype=torch.float64) / (1 + math.e + math.e**2)
    pB = torch.tensor([1, math.e, math.e, 0.0], dtype=torch.float64) / (1 + 2 * math.e)
    assert est["tv"] == pytest.approx(0.5 * float((p - pB).abs().sum()), rel=1e-12)
    assert est["kl"] == pytest.approx(float((p[:3] * (p[:3] / pB[:3]).log()).sum()), rel=1e-12)
    assert est["log_Z"] == pytest.approx(math.log((1 + math.e + math.e**2) / 4), rel=1e-12)
    assert est["acceptance_rate"] == pytest.approx((math.exp(-1) + 1 + 1 + 0) / 4, rel=1e-12)


def test_qrs_with_an_infinite_or_nan_log_bound_is_an_error_not_a_loop():
    post = pst.Posterior(two_token_prior(), count_a(1.0), beta=0.5)
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="log_bound must be a finite number"):
            post.sample(n=4, method="qrs", max_new_tokens=T, log_bound=bad)


def test_bon_with_every_reward_neg_inf_raises_degenerate_as_soft_bon_does():
    post = pst.Posterior(two_token_prior(), Contains("zzz"), beta=1.0)
    for method in ("bon", "soft_bon"):
        with pytest.raises(pst.DegenerateWeightsError, match=rf"{method}: all 3 draws of output 0 .* reward -inf"):
            post.sample(n=4, method=method, max_new_tokens=2, best_of=3, seed=0)


def test_proposal_with_zero_mass_where_the_prior_has_mass_is_detected():
    """A proposal that never emits "b" cannot see the part of pi* that starts with "b"."""
    no_b = pst.CallablePrior(["a", "b", "<eos>"], lambda ids: torch.tensor([0.6, 0.0, 0.4]).log().expand(ids.shape[0], 3))
    post = pst.Posterior(two_token_prior(), count_a(1.0), beta=1.0)
    for method in ("is", "qrs"):
        with pytest.raises(ValueError, match=r"gives probability 0 to token 'b' after '.*' \(prompt <unconditional>\), where the prior gives it 0.3"):
            post.sample(n=32, method=method, max_new_tokens=T, proposal=no_b, seed=0)
    top1 = pst.Posterior(two_token_prior(), count_a(1.0), beta=1.0)
    top1_q = two_token_prior()
    top1_q.top_k = 1  # the same prior truncated to its most likely token
    with pytest.raises(ValueError, match="gives probability 0 to token"):
        top1.sample(n=8, method="is", max_new_tokens=T, proposal=top1_q, seed=0)
    full = two_token_prior((0.2, 0.3, 0.5))
    res = post.sample(n=64, method="is", max_new_tokens=T, proposal=full, seed=0)
    assert res.info["proposal_support"] == "checked along the draws"


@pytest.mark.parametrize("method, kw", [("rejection", {"reward_upper_bound": 50.0}), ("qrs", {"log_bound": 100.0})])
def test_loose_bound_fails_fast_after_one_batch_instead_of_running_for_minutes(method, kw):
    """Acceptance ~exp(-94): the old loop drew 100000 times per prompt before giving up."""
    post = pst.Posterior(two_token_prior(), count_a(1.0), beta=0.5)
    t0 = time.perf_counter()
    with pytest.raises(pst.DegenerateWeightsError, match=r"accepted 0 of 16 draws .*would need about .* more than max_draws=16000"):
        post.sample(n=16, method=method, max_new_tokens=T, seed=0, **kw)
    assert time.perf_counter() - t0 < 10


def test_impossible_constraint_stops_by_the_rule_of_three_before_max_draws():
    post = pst.Posterior(two_token_prior(), Contains("aaaa"), beta=1.0)
    with pytest.raises(pst.DegenerateWeightsError, match=r"accepted 0 of (\d+) draws") as e:
        post.sample(n=8, method="rejection", max_new_tokens=T, reward_upper_bound=0.0, max_draws=800, seed=0)
    drawn = int(str(e.value).split("accepted 0 of ")[1].split()[0])
    assert drawn < 800 and drawn + 8 * drawn / 3 > 800


def test_max_draws_scales_with_n_by_default():
    post = pst.Posterior(two_token_prior(), count_a(1.0), beta=0.5)
    for n in (4, 40):
        res = post.sample(n=n, method="rejection", max_new_tokens=T, seed=0, reward_upper_bound=3.0)
        assert res.info["max_draws"] == 1000 * n


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def test_numpy_and_torch_scalars_are_accepted_where_ints_and_floats_are():
    prior = two_token_prior()
    plain = pst.Posterior(prior, count_a(1.0), beta=0.5)
    npy = pst.Posterior(prior, count_a(1.0), beta=np.float32(0.5))
    tch = pst.Posterior(prior, count_a(1.0), beta=torch.tensor(0.5, dtype=torch.float64))
    assert npy.beta == tch.beta == 0.5 and isinstance(npy.beta, float)
    for method, kw, kw_np in [
        ("is", {}, {}),
        ("bon", {"best_of": 2}, {"best_of": np.int64(2)}),
        ("smc", {"lookahead": 2, "ess_threshold": 0.5}, {"lookahead": np.int32(2), "ess_threshold": np.float64(0.5)}),
        ("rejection", {"reward_upper_bound": 3.0, "batch_size": 4}, {"reward_upper_bound": np.float64(3), "batch_size": torch.tensor(4)}),
        ("mh", {"steps": 4}, {"steps": np.int64(4)}),
    ]:
        a = plain.sample(n=8, method=method, max_new_tokens=T, seed=1, **kw)
        b = npy.sample(n=np.int64(8), method=method, max_new_tokens=torch.tensor(T), seed=np.int64(1), **kw_np)
        assert torch.equal(a.tokens, b.tokens), method


@pytest.mark.parametrize("name, kw", [("n", {"n": np.float64(2.0)}), ("n", {"n": torch.tensor([1, 2])}),
                                      ("max_new_tokens", {"max_new_tokens": np.bool_(True)}),
                                      ("n", {"n": True})])
def test_non_integer_counts_are_refused_naming_the_value(name, kw):
    post = pst.Posterior(two_token_prior(), count_a(1.0), beta=0.5)
    kw = {"n": 2, "max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=rf"{name} must be a positive int, got"):
        post.sample(**kw)


def test_seed_none_draws_fresh_entropy_and_the_result_records_it_for_replay():
    post = pst.Posterior(two_token_prior(), count_a(1.0), beta=0.5)
    a = post.sample(n=32, max_new_tokens=T, seed=None)
    b = post.sample(n=32, max_new_tokens=T, seed=None)
    assert isinstance(a.seed, int) and a.seed != b.seed
    replay = post.sample(n=32, max_new_tokens=T, seed=a.seed)
    assert torch.equal(replay.tokens, a.tokens) and replay.seed == a.seed
    assert post.sample(n=2, max_new_tokens=T, seed=5).seed == 5
    assert post.sample(n=2, max_new_tokens=T, generator=torch.Generator().manual_seed(5)).seed is None
    assert a.summary()["seed"] == a.seed and f"seed {a.seed}" in a.format_summary()


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "0", True])
def test_bad_seeds_are_refused_naming_the_value(seed):
    post = pst.Posterior(two_token_prior(), count_a(1.0), beta=0.5)
    with pytest.raises(ValueError, match=rf"seed must be an int in \[0, 2\*\*64\) or None .*got {seed!r}"):
        post.sample(n=2, max_new_tokens=T, seed=seed)


@pytest.mark.parametrize("generator", [0, "cpu", np.random.default_rng(0)])
def test_generator_of_the_wrong_type_is_refused(generator):
    post = pst.Posterior(two_token_prior(), count_a(1.0), beta=0.5)
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got"):
        post.sample(n=2, max_new_tokens=T, generator=generator)


@pytest.mark.parametrize("method, kw, match", [
    ("rejection", {"reward_upper_bound": 3.0, "batch_size": 0}, "batch_size must be a positive int, got 0"),
    ("rejection", {"reward_upper_bound": 3.0, "max_draws": 2.5}, "max_draws must be a positive int, got 2.5"),
    ("qrs", {"batch_size": "8"}, "batch_size must be a positive int, got '8'"),
    ("qrs", {"max_draws": -1}, "max_draws must be a positive int, got -1"),
    ("rejection", {"reward_upper_bound": math.nan}, "reward_upper_bound must be a finite number, got nan"),
])
def test_batch_size_max_draws_and_bounds_are_validated(method, kw, match):
    post = pst.Posterior(two_token_prior(), count_a(1.0), beta=0.5)
    with pytest.raises(ValueError, match=match):
        post.sample(n=4, method=method, max_new_tokens=T, **kw)


@pytest.mark.parametrize("kw, match", [
    ({"temperature": 1e-40}, "temperature=1e-40 is too small: 1/temperature overflows float32"),
    ({"top_p": "0.9"}, "top_p must be a number in \\(0, 1\\] or None, got '0.9'"),
    ({"top_k": 2.0}, "top_k must be a positive int or None, got 2.0"),
])
def test_prior_sampling_modifiers_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        pst.CallablePrior(["a", "<eos>"], lambda ids: torch.zeros(ids.shape[0], 2).log_softmax(-1), **kw)
    with pytest.raises(ValueError, match=match):
        tiny_hf_prior("gpt2", **kw)


def test_prior_sampling_modifiers_accept_numpy_scalars():
    prior = tiny_hf_prior("gpt2", temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.9))
    assert (prior.temperature, prior.top_k, prior.top_p) == (0.5, 5, 0.9)
    assert type(prior.top_k) is int and type(prior.top_p) is float


@pytest.mark.parametrize("device, match", [("nonsense", "device must be a torch device"),
                                           ("cuda:0", "device 'cuda:0' (is not available|does not exist)")])
def test_bad_device_is_refused_naming_it(device, match):
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"
        match = "does not exist"
    base = tiny_hf_prior("gpt2")
    with pytest.raises(ValueError, match=match):
        pst.HFPrior(base.model, base.tokenizer, device=device)


def test_hf_prior_given_something_that_is_not_a_model_is_refused():
    base = tiny_hf_prior("gpt2")
    with pytest.raises(ValueError, match="model must be a loaded transformers causal LM .*got str"):
        pst.HFPrior("gpt2", base.tokenizer)
    with pytest.raises(ValueError, match="model must be a loaded transformers causal LM"):
        pst.HFPrior(base.tokenizer, base.model)  # swapped
    with pytest.raises(ValueError, match="tokenizer must be a transformers tokenizer, got NoneType"):
        pst.HFPrior(base.model, None)


def test_checkpoint_that_is_not_a_causal_lm_fails_at_load_naming_its_path(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from posterior.testing import char_tokenizer

    path = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    with pytest.raises(ValueError, match=rf"{str(path)!r} is not a transformers causal LM checkpoint"):
        pst.HFPrior.from_pretrained(str(path))


# --------------------------------------------------------------------------------------------------
# Output a person can read
# --------------------------------------------------------------------------------------------------
def test_text_summary_explains_each_number_and_summarises_per_step_arrays():
    post = pst.Posterior(markov_prior(), count_a(1.0, prefixes=True), beta=0.3)
    res = post.sample(n=32, method="smc", max_new_tokens=4, seed=0, ess_threshold=1.0)
    text = res.format_summary()
    assert "effective samples out of 32" in text
    assert "log Z " in text and "log normaliser of pi*" in text
    assert "KL(pi*||pi0)" in text and "nats" in text
    assert "<array" not in text and "ESS per step   min " in text and "/ median " in text and "/ last " in text
    k = int(res.info["resampled"][0].sum())
    assert k >= 2 and f"resampled      at {k} of {res.info['resampled'].shape[1]} steps" in text
    d = res.distinct()[0]
    assert d < 32 and f"warning: {d} distinct of 32 samples" in text


def test_text_summary_warns_where_it_matters():
    post = pst.Posterior(markov_prior(), count_a(1.0), beta=0.05)  # a peaked posterior: IS has ESS ~1
    res = post.sample(n=64, method="is", max_new_tokens=4, seed=0)
    assert res.ess.item() < 6.4
    assert "warning: ESS" in res.format_summary() and "below 10% of N=64" in res.format_summary()
    calm = pst.Posterior(markov_prior(), count_a(1.0), beta=50.0).sample(n=64, method="is", max_new_tokens=4, seed=0)
    assert "warning" not in calm.format_summary()
    mh = pst.Posterior(markov_prior(), count_a(1.0), beta=0.3).sample(n=8, method="mh", max_new_tokens=4, seed=0, steps=4)
    mh.info = mh.info.replace(r_hat=torch.tensor([1.5], dtype=torch.float64))  # infos are frozen: a new one
    assert "warning: R-hat 1.500 is above 1.1" in mh.format_summary()
    mh.info = mh.info.replace(r_hat=torch.tensor([1.01], dtype=torch.float64))
    assert "R-hat" in mh.format_summary() and "warning: R-hat" not in mh.format_summary()


def test_bon_summary_says_it_selects_and_reports_the_kl_bound():
    res = pst.Posterior(markov_prior(), count_a(1.0), beta=0.3).sample(n=8, method="bon", max_new_tokens=4, seed=0, best_of=4)
    text = res.format_summary()
    assert "bon selects, it does not sample pi*" in text and "KL(bon||pi0)   <= 0.6363 nats" in text
    assert "effective samples" not in text
