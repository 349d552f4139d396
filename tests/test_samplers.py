"""Every foundation sampler against an enumerated posterior (fixed seeds, derived tolerances)."""

import functools
import itertools
import json
import math

import pytest
import torch

import posterior as pst
from posterior.exact import empirical, exact_posterior, sequence_keys, total_variation
from posterior.samplers.rejection import qrs_estimates
from posterior.testing import markov_prior, two_token_prior

from conftest import const_reward, count_a_reward, tv_to_exact, tv_tolerance
import time
from posterior.diagnostics import log_weight_stats
from posterior.diagnostics import qrs_estimates as qrs_estimates_h11
from posterior.rewards import Callable
from posterior.rewards import Contains
import json
import sys
from posterior.testing import tiny_hf_prior

BETA = 0.5
T = 3  # max_new_tokens: two_token_prior then has 15 continuations


def count_a(texts):
    return [float(t.count("a")) for t in texts]


@pytest.fixture
def post():
    return pst.Posterior(two_token_prior(), pst.rewards.Callable(count_a), beta=BETA)


@pytest.fixture
def exact(post):
    return exact_posterior(post.prior, post.reward, BETA, T)


def test_importance_sampling_matches_enumerated_posterior(post, exact):
    n = 20_000
    res = post.sample(n=n, method="is", max_new_tokens=T, seed=1)
    assert torch.allclose(torch.logsumexp(res.log_weights, -1), torch.zeros(1), atol=1e-5)
    assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), res.ess.item())
    assert abs(res.log_Z.item() - exact.log_Z) < 0.05
    # KL(pi*||pi0) = E_pi*[r]/beta - log Z, against the enumerated value.
    assert res.kl().item() == pytest.approx(exact.kl, abs=0.05)


def test_importance_sampling_with_another_proposal(post, exact):
    q = two_token_prior((0.2, 0.3, 0.5))
    res = post.sample(n=20_000, method="is", max_new_tokens=T, seed=2, proposal=q)
    assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), res.ess.item())
    assert abs(res.log_Z.item() - exact.log_Z) < 0.05
    assert res.ess.item() < 20_000 * 0.9  # a worse proposal shows in the ESS


def test_importance_sampling_with_a_proposal_equal_to_the_posterior_has_full_ess():
    """At beta -> the reward is constant 0, the posterior is the prior: log Z = 0, ESS = n."""
    post = pst.Posterior(two_token_prior(), pst.rewards.Callable(lambda ts: [0.0] * len(ts)), beta=1.0)
    res = post.sample(n=500, method="is", max_new_tokens=T, seed=0)
    assert res.ess.item() == pytest.approx(500.0)
    assert res.log_Z.item() == pytest.approx(0.0, abs=1e-6)


def test_rejection_sampling_is_exact(post, exact):
    n = 4000
    res = post.sample(n=n, method="rejection", max_new_tokens=T, seed=3, reward_upper_bound=3.0)
    assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), n)
    # (n-1)/(D-1) exp(R/beta) is unbiased for Z; relative sd about 1/sqrt(n).
    assert abs(res.log_Z.item() - exact.log_Z) < 4 / math.sqrt(n)
    assert 0 < res.info["acceptance_rate"].item() < 1


def test_qrs_with_a_bound_above_every_weight_is_exact(post, exact):
    n = 4000
    res = post.sample(n=n, method="qrs", max_new_tokens=T, seed=4, log_bound=3.0 / BETA)
    assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), n)
    assert abs(res.log_Z.item() - exact.log_Z) < 0.05
    assert res.info["tv_estimate"].item() < 1e-9


def test_qrs_with_a_low_bound_samples_min_qB_P_and_estimates_its_divergence(post, exact):
    """Below max w, QRS samples p_B ∝ min(q B, P) exactly; its TV estimate matches the exact TV."""
    log_B = 2.0 / BETA  # weights exp(r/beta) with r in 0..3: clipped for r = 3
    n = 4000
    res = post.sample(n=n, method="qrs", max_new_tokens=T, seed=5, log_bound=log_B, batch_size=4000)
    log_P = exact.log_prior + exact.rewards / BETA
    log_pB = torch.minimum(log_P, exact.log_prior + log_B)
    pB = (log_pB - torch.logsumexp(log_pB, 0)).exp()
    target = dict(zip(exact.sequences, pB.tolist()))
    keys = sequence_keys(res.tokens, res.lengths)[0]
    assert total_variation(empirical(keys), target) < tv_tolerance(target.values(), n)
    exact_tv = total_variation(target, exact.prob())
    assert exact_tv > 0.02  # the bound really truncates
    assert res.info["tv_estimate"].item() == pytest.approx(exact_tv, abs=0.02)
    # The same estimator on the exact expectation (weights = prior-weighted atoms) is exact.
    est = qrs_estimates(log_P - exact.log_prior, log_B)
    assert est["acceptance_rate"] > 0


def test_best_of_n_matches_its_exact_distribution(distinct_reward):
    k, n = 3, 12_000
    post = pst.Posterior(two_token_prior(), distinct_reward, beta=1.0)
    ex = exact_posterior(post.prior, distinct_reward, 1.0, T)
    p = ex.log_prior.exp()
    r = ex.rewards
    assert len(set(r.tolist())) == len(r)  # distinct rewards
    F = torch.stack([(p * (r < ri)).sum() for ri in r])  # pi0(r(X) < r(x))
    bon = ((F + p) ** k - F**k).tolist()
    assert sum(bon) == pytest.approx(1.0)
    res = post.sample(n=n, method="bon", max_new_tokens=T, seed=6, best_of=k)
    got = empirical(sequence_keys(res.tokens, res.lengths)[0])
    target = dict(zip(ex.sequences, bon))
    assert total_variation(got, target) < tv_tolerance(target.values(), n)
    assert res.log_Z is None and not res.targets_posterior


def test_soft_best_of_n_matches_its_exact_distribution(distinct_reward):
    k, n, beta = 3, 12_000, 0.2
    post = pst.Posterior(two_token_prior(), distinct_reward, beta=beta)
    ex = exact_posterior(post.prior, distinct_reward, beta, T)
    p, s = ex.log_prior.exp(), ex.rewards / beta
    # P(x) = k p(x) E[e^{s(x)} / (e^{s(x)} + sum of k-1 others)], enumerated over the others.
    S = len(p)
    probs = torch.zeros(S, dtype=torch.float64)
    for others in itertools.product(range(S), repeat=k - 1):
        po = math.prod(p[j].item() for j in others)
        so = sum(math.exp(s[j].item()) for j in others)
        probs += k * p * po * s.exp() / (s.exp() + so)
    assert probs.sum().item() == pytest.approx(1.0)
    res = post.sample(n=n, method="soft_bon", max_new_tokens=T, seed=7, best_of=k)
    got = empirical(sequence_keys(res.tokens, res.lengths)[0])
    target = dict(zip(ex.sequences, probs.tolist()))
    assert total_variation(got, target) < tv_tolerance(target.values(), n)


def test_many_prompts_are_sampled_independently_against_their_own_posteriors():
    prior = markov_prior(("a", "b", "<eos>"), seed=3)
    post = pst.Posterior(prior, pst.rewards.Callable(count_a), beta=1.0)
    prompts = ["a", "bb", "ab"]
    res = post.sample(n=20_000, method="is", max_new_tokens=3, prompts=prompts, seed=8)
    assert res.log_weights.shape == (3, 20_000)
    for i, prompt in enumerate(prompts):
        ex = exact_posterior(prior, post.reward, 1.0, 3, prompt=prompt)
        assert tv_to_exact(res, ex, prompt=i) < tv_tolerance(ex.prob().values(), res.ess[i].item())
        assert abs(res.log_Z[i].item() - ex.log_Z) < 0.05


def test_same_seed_same_samples_and_generator_is_honoured(post):
    a = post.sample(n=50, method="is", max_new_tokens=T, seed=11)
    b = post.sample(n=50, method="is", max_new_tokens=T, seed=11)
    c = post.sample(n=50, method="is", max_new_tokens=T, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, post.sample(n=50, method="is", max_new_tokens=T, seed=12).tokens)


def test_log_density_of_given_texts_matches_enumeration(post, exact):
    texts = ["ab", "", "ba"]
    got = post.log_density(texts)
    want = {t: lp + r / BETA for t, lp, r in zip(exact.texts, exact.log_prior.tolist(), exact.rewards.tolist())}
    assert got.tolist() == pytest.approx([want[t] for t in texts], abs=1e-6)


def test_result_summary_and_pyro(post):
    res = post.sample(n=64, method="is", max_new_tokens=T, seed=0)
    s = res.summary()
    assert set(s) >= {"reward_mean", "ess", "log_Z", "kl", "method"}
    (emp,) = res.to_pyro()
    assert emp.event_shape == res.tokens.shape[-1:]
    assert torch.allclose(emp.log_weights.logsumexp(0), torch.tensor(0.0), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening.py (issue 11: numbers never silently wrong, inputs checked at the boundary); each test is named after what broke
# --------------------------------------------------------------------------------------------------
T_h11 = 3  # two_token_prior at max_new_tokens=3: 15 continuations; only "aaa" has three a's


P_AAA = 0.5**3  # pi0("aaa")


count_a_h11, const = count_a_reward, const_reward


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
    post = pst.Posterior(two_token_prior(), count_a_h11(scale), beta=beta)
    ex = exact_posterior(post.prior, post.reward, beta, T_h11)
    assert ex.kl == pytest.approx(math.log(8), abs=1e-6)  # the prior is float32
    res = post.sample(n=n, method=method, max_new_tokens=T_h11, seed=3, **kw)
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


@pytest.mark.parametrize("method", ["smc", "mh"])
def test_samplers_that_add_log_prior_to_r_over_beta_refuse_unresolvable_scales(method):
    """SMC and MH form log pi0 + r/beta: at |r/beta| = 1e17 float64 steps are 16 nats."""
    post = pst.Posterior(two_token_prior(), count_a_h11(1.0, prefixes=True), beta=1e-17)
    with pytest.raises(ValueError, match=rf"r/beta overflows float64 for method '{method}'"):
        post.sample(n=8, method=method, max_new_tokens=T_h11, seed=0)


@pytest.mark.parametrize("method, kw", [("is", {}), ("rejection", {"reward_upper_bound": 3.0}), ("qrs", {}),
                                        ("smc", {})])
def test_r_over_beta_beyond_float64_raises_naming_the_overflow(method, kw):
    post = pst.Posterior(two_token_prior(), count_a_h11(1.0, prefixes=True), beta=1e-320)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="r/beta overflows float64"):
        post.sample(n=8, method=method, max_new_tokens=T_h11, seed=0, **kw)
    assert time.perf_counter() - t0 < 20  # an error, not a loop to max_draws


@pytest.mark.parametrize("c, beta", [(0.0, 1.0), (1e6, 1e-3), (-3.0, 0.5), (2.0, 1e-9)])
@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("method", ["is", "rejection", "qrs", "smc"])
def test_constant_reward_gives_kl_zero_for_every_method_and_n(method, n, c, beta):
    """pi* = pi0 when r is constant: KL(pi*||pi0) = 0 and log Z = c/beta exactly. SMC with the
    reward as its own twist (the reward accepts prefixes)."""
    kw = {"reward_upper_bound": c} if method == "rejection" else {}
    post = pst.Posterior(markov_prior(), const(c, prefixes=True), beta=beta)
    res = post.sample(n=n, method=method, max_new_tokens=T_h11, seed=n, **kw)
    assert res.kl().item() == pytest.approx(0.0, abs=1e-12)
    assert res.log_Z.item() == pytest.approx(c / beta, rel=1e-15, abs=1e-12)
    assert res.ess.item() == pytest.approx(n, rel=1e-6)


@pytest.mark.parametrize("method", ["mh", "bon", "soft_bon"])
def test_constant_reward_methods_without_log_z_report_no_kl(method):
    res = pst.Posterior(markov_prior(), const(1e6), beta=1e-3).sample(n=4, method=method, max_new_tokens=T_h11, seed=0)
    assert res.kl() is None and res.log_Z is None


def test_every_log_z_is_float64():
    """QRS stored its log Z as float32 (torch.tensor of Python floats)."""
    post = pst.Posterior(two_token_prior(), count_a_h11(1.0, prefixes=True), beta=0.5)
    for method, kw in [("is", {}), ("smc", {}), ("rejection", {"reward_upper_bound": 3.0}), ("qrs", {})]:
        res = post.sample(n=16, method=method, max_new_tokens=T_h11, seed=0, **kw)
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
        est = qrs_estimates_h11(lw, B)
        assert est["kl"] >= 0 and est["tv"] >= 0
        a, b = log_weight_stats(lw), log_weight_stats(lw.clamp(max=B))
        p = a.log_weights.exp()
        negative_before += float((p * (a.log_weights - b.log_weights)).sum()) < 0
    assert negative_before > 0  # the unclamped sum does go below 0 on these inputs


def test_qrs_estimates_match_the_exact_divergences():
    log_w = torch.tensor([0.0, 1.0, 2.0, -math.inf], dtype=torch.float64)
    est = qrs_estimates_h11(log_w, 1.0)
    p = torch.tensor([1, math.e, math.e**2, 0.0], dtype=torch.float64) / (1 + math.e + math.e**2)
    pB = torch.tensor([1, math.e, math.e, 0.0], dtype=torch.float64) / (1 + 2 * math.e)
    assert est["tv"] == pytest.approx(0.5 * float((p - pB).abs().sum()), rel=1e-12)
    assert est["kl"] == pytest.approx(float((p[:3] * (p[:3] / pB[:3]).log()).sum()), rel=1e-12)
    assert est["log_Z"] == pytest.approx(math.log((1 + math.e + math.e**2) / 4), rel=1e-12)
    assert est["acceptance_rate"] == pytest.approx((math.exp(-1) + 1 + 1 + 0) / 4, rel=1e-12)


def test_qrs_with_an_infinite_or_nan_log_bound_is_an_error_not_a_loop():
    post = pst.Posterior(two_token_prior(), count_a_h11(1.0), beta=0.5)
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="log_bound must be a finite number"):
            post.sample(n=4, method="qrs", max_new_tokens=T_h11, log_bound=bad)


def test_bon_with_every_reward_neg_inf_raises_degenerate_as_soft_bon_does():
    post = pst.Posterior(two_token_prior(), Contains("zzz"), beta=1.0)
    for method in ("bon", "soft_bon"):
        with pytest.raises(pst.DegenerateWeightsError, match=rf"{method}: all 3 draws of output 0 .* reward -inf"):
            post.sample(n=4, method=method, max_new_tokens=2, best_of=3, seed=0)


def test_proposal_with_zero_mass_where_the_prior_has_mass_is_detected():
    """A proposal that never emits "b" cannot see the part of pi* that starts with "b"."""
    no_b = pst.CallablePrior(["a", "b", "<eos>"], lambda ids: torch.tensor([0.6, 0.0, 0.4]).log().expand(ids.shape[0], 3))
    post = pst.Posterior(two_token_prior(), count_a_h11(1.0), beta=1.0)
    for method in ("is", "qrs"):
        with pytest.raises(ValueError, match=r"gives probability 0 to token 'b' after '.*' \(prompt <unconditional>\), where the prior gives it 0.3"):
            post.sample(n=32, method=method, max_new_tokens=T_h11, proposal=no_b, seed=0)
    top1 = pst.Posterior(two_token_prior(), count_a_h11(1.0), beta=1.0)
    top1_q = two_token_prior()
    top1_q.top_k = 1  # the same prior truncated to its most likely token
    with pytest.raises(ValueError, match="gives probability 0 to token"):
        top1.sample(n=8, method="is", max_new_tokens=T_h11, proposal=top1_q, seed=0)
    full = two_token_prior((0.2, 0.3, 0.5))
    res = post.sample(n=64, method="is", max_new_tokens=T_h11, proposal=full, seed=0)
    assert res.info["proposal_support"] == "checked along the draws"


@pytest.mark.parametrize("method, kw", [("rejection", {"reward_upper_bound": 50.0}), ("qrs", {"log_bound": 100.0})])
def test_loose_bound_fails_fast_after_one_batch_instead_of_running_for_minutes(method, kw):
    """Acceptance ~exp(-94): the old loop drew 100000 times per prompt before giving up."""
    post = pst.Posterior(two_token_prior(), count_a_h11(1.0), beta=0.5)
    t0 = time.perf_counter()
    with pytest.raises(pst.DegenerateWeightsError, match=r"accepted 0 of 16 draws .*would need about .* more than max_draws=16000"):
        post.sample(n=16, method=method, max_new_tokens=T_h11, seed=0, **kw)
    assert time.perf_counter() - t0 < 10


def test_impossible_constraint_stops_by_the_rule_of_three_before_max_draws():
    post = pst.Posterior(two_token_prior(), Contains("aaaa"), beta=1.0)
    with pytest.raises(pst.DegenerateWeightsError, match=r"accepted 0 of (\d+) draws") as e:
        post.sample(n=8, method="rejection", max_new_tokens=T_h11, reward_upper_bound=0.0, max_draws=800, seed=0)
    drawn = int(str(e.value).split("accepted 0 of ")[1].split()[0])
    assert drawn < 800 and drawn + 8 * drawn / 3 > 800


def test_max_draws_scales_with_n_by_default():
    post = pst.Posterior(two_token_prior(), count_a_h11(1.0), beta=0.5)
    for n in (4, 40):
        res = post.sample(n=n, method="rejection", max_new_tokens=T_h11, seed=0, reward_upper_bound=3.0)
        assert res.info["max_draws"] == 1000 * n


def test_seed_none_draws_fresh_entropy_and_the_result_records_it_for_replay():
    post = pst.Posterior(two_token_prior(), count_a_h11(1.0), beta=0.5)
    a = post.sample(n=32, max_new_tokens=T_h11, seed=None)
    b = post.sample(n=32, max_new_tokens=T_h11, seed=None)
    assert isinstance(a.seed, int) and a.seed != b.seed
    replay = post.sample(n=32, max_new_tokens=T_h11, seed=a.seed)
    assert torch.equal(replay.tokens, a.tokens) and replay.seed == a.seed
    assert post.sample(n=2, max_new_tokens=T_h11, seed=5).seed == 5
    assert post.sample(n=2, max_new_tokens=T_h11, generator=torch.Generator().manual_seed(5)).seed is None
    assert a.summary()["seed"] == a.seed and f"seed {a.seed}" in a.format_summary()


def test_text_summary_explains_each_number_and_summarises_per_step_arrays():
    post = pst.Posterior(markov_prior(), count_a_h11(1.0, prefixes=True), beta=0.3)
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
    post = pst.Posterior(markov_prior(), count_a_h11(1.0), beta=0.05)  # a peaked posterior: IS has ESS ~1
    res = post.sample(n=64, method="is", max_new_tokens=4, seed=0)
    assert res.ess.item() < 6.4
    assert "warning: ESS" in res.format_summary() and "below 10% of N=64" in res.format_summary()
    calm = pst.Posterior(markov_prior(), count_a_h11(1.0), beta=50.0).sample(n=64, method="is", max_new_tokens=4, seed=0)
    assert "warning" not in calm.format_summary()
    mh = pst.Posterior(markov_prior(), count_a_h11(1.0), beta=0.3).sample(n=8, method="mh", max_new_tokens=4, seed=0, steps=4)
    mh.info = mh.info.replace(r_hat=torch.tensor([1.5], dtype=torch.float64))  # infos are frozen: a new one
    assert "warning: R-hat 1.500 is above 1.1" in mh.format_summary()
    mh.info = mh.info.replace(r_hat=torch.tensor([1.01], dtype=torch.float64))
    assert "R-hat" in mh.format_summary() and "warning: R-hat" not in mh.format_summary()


def test_bon_summary_says_it_selects_and_reports_the_kl_bound():
    res = pst.Posterior(markov_prior(), count_a_h11(1.0), beta=0.3).sample(n=8, method="bon", max_new_tokens=4, seed=0, best_of=4)
    text = res.format_summary()
    assert "bon selects, it does not sample pi*" in text and "KL(bon||pi0)   <= 0.6363 nats" in text
    assert "effective samples" not in text


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening2.py (issue 19, hardening round two); each test is named after the failure it pins down
# --------------------------------------------------------------------------------------------------
T_h19 = 3  # two_token_prior at max_new_tokens=3: 15 continuations


count_a_h19 = functools.partial(count_a_reward, name="count_a")
const_h19 = functools.partial(const_reward, name="const")


@pytest.mark.parametrize("n", [1, 2, 5])
def test_rejection_log_z_is_unbiased_for_every_n(n):
    """n = 1 used n/draws: E[1/D] for a geometric D is not p (+160% on the issue's toy, +77% here).
    Z = sum pi0 e^{r/beta} with r = count_a, bound R = 3; mean of Ẑ over 200 seeds within 3 SE."""
    prior, reward = two_token_prior(), count_a_h19()
    post = pst.Posterior(prior, reward, beta=1.0)
    Z = math.exp(exact_posterior(prior, reward, 1.0, T_h19).log_Z)
    z = torch.tensor([
        post.sample(n=n, method="rejection", max_new_tokens=T_h19, seed=s, reward_upper_bound=3.0).log_Z.exp().item()
        for s in range(200)
    ], dtype=torch.float64)  # fmt: skip
    se = z.std().item() / math.sqrt(len(z))
    assert abs(z.mean().item() - Z) < 3 * se, (z.mean().item(), Z, se)


def test_rejection_log_z_is_unbiased_for_every_n_and_finite_at_n_1_under_a_hard_constraint():
    """A hard constraint (a(x) in {0, 1}) at n = 1: the estimate is finite on every seed, unbiased
    over seeds (3 SE), and the sample is the first accepted draw, one per prompt."""
    from posterior.rewards import Contains

    prior, reward = two_token_prior(), Contains("bb")
    post = pst.Posterior(prior, reward, beta=1.0)
    Z = math.exp(exact_posterior(prior, reward, 1.0, T_h19).log_Z)
    runs = [post.sample(n=1, method="rejection", max_new_tokens=T_h19, seed=s, reward_upper_bound=0.0) for s in range(200)]
    assert all(r.tokens.shape[1] == 1 and "bb" in r.texts[0][0] for r in runs)
    z = torch.tensor([r.log_Z.exp().item() for r in runs], dtype=torch.float64)
    assert bool(torch.isfinite(z.log()).all())
    se = z.std().item() / math.sqrt(len(z))
    assert abs(z.mean().item() - Z) < 3 * se, (z.mean().item(), Z, se)


@pytest.mark.parametrize("beta", [1e-12, 1e-17, 1e-300])
def test_exact_posterior_is_exact_at_every_scale(beta):
    """A constant reward at beta = 1e-17 gave a pi* summing to 13 and KL 38.5 (r/beta rounded log
    pi0 away). Constant: pi* = pi0 and log Z = c/beta + log sum pi0. Non-constant: r = 0.7·beta·#a
    at beta must equal r = 0.7·#a at beta = 1."""
    prior = two_token_prior()
    base = exact_posterior(prior, const_h19(0.0), 1.0, T_h19)
    ex = exact_posterior(prior, const_h19(1.0), beta, T_h19)
    assert ex.log_posterior.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(ex.log_posterior, base.log_posterior, atol=1e-12, rtol=0)
    assert ex.kl == pytest.approx(0.0, abs=1e-6)  # the prior is float32: sum pi0 = 1 to ~1e-7
    assert ex.log_Z == 1.0 / beta + base.log_Z  # base.log_Z ~ 1e-8 vanishes in the float64 sum
    want = exact_posterior(prior, count_a_h19(0.7), 1.0, T_h19)
    got = exact_posterior(prior, count_a_h19(0.7 * beta), beta, T_h19)
    assert torch.allclose(got.log_posterior, want.log_posterior, atol=1e-9, rtol=0)
    assert got.kl == pytest.approx(want.kl, abs=1e-9)
    assert got.log_Z == pytest.approx(want.log_Z, abs=1e-9)


def test_exact_posterior_is_exact_at_every_scale_or_refuses_where_log_z_overflows():
    with pytest.raises(ValueError, match="overflows float64"):
        exact_posterior(two_token_prior(), const_h19(1e10), 1e-300, T_h19)


# --------------------------------------------------------------------------------------------------
# Moved from test_rewards_extra.py: model-based rewards (Classifier, Similarity, LMJudge) and the reward registry
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def result():
    prior = tiny_hf_prior()
    r = pst.rewards.Callable(lambda ts: [0.0 if "a" in t else -math.inf for t in ts], name="has_a")
    return pst.Posterior(prior, r, beta=1.0).sample(n=24, method="is", max_new_tokens=8, prompts=["hi", "yo"])


def test_to_jsonl_is_strict_json_with_nulls_for_non_finite(result, tmp_path):
    path = tmp_path / "s.jsonl"
    assert result.to_jsonl(path) == 48
    lines = path.read_text().splitlines()
    recs = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}")) for line in lines]
    assert len(recs) == 48 and [r["prompt"] for r in recs[:24]] == ["hi"] * 24
    for r in recs:
        p, i = r["prompt_index"], r["sample"]
        assert r["text"] == result.texts[p][i] and r["length"] == int(result.lengths[p, i])
        if math.isfinite(result.rewards[p, i]):
            assert r["reward"] == 0.0 and "nonfinite" not in r
            assert r["log_weight"] == pytest.approx(float(result.log_weights[p, i]))
        else:
            assert r["reward"] is None and r["log_weight"] is None and r["nonfinite"] == {"reward": "-inf", "log_weight": "-inf"}
    assert any(r["reward"] is None for r in recs) and any(r["reward"] == 0.0 for r in recs)


def test_to_pandas(result, monkeypatch):
    pd = pytest.importorskip("pandas")
    df = result.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == 48
    assert list(df.columns) == ["prompt_index", "sample", "prompt", "text", "reward", "log_weight", "log_prior", "length"]
    assert df["reward"].tolist() == result.rewards.reshape(-1).tolist()
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ImportError, match="pip install pandas"):
        result.to_pandas()


# --------------------------------------------------------------------------------------------------
# The typed method interface: options in, infos out, the registry (issue 28, items 1-3)
# --------------------------------------------------------------------------------------------------
#: The option table as it was before the options became dataclasses: {method: {option: default}}.
OLD_DEFAULTS = {
    "is": {"proposal": None},
    "bon": {"best_of": 4},
    "soft_bon": {"best_of": 4},
    "rejection": {"reward_upper_bound": None, "batch_size": None, "max_draws": None},
    "qrs": {"log_bound": None, "proposal": None, "batch_size": None, "max_draws": None},
    "smc": {"ess_threshold": 0.5, "resampling": "systematic", "twist": "auto", "proposal": "bootstrap", "lookahead": 8,
            "block_size": 1, "decode_ahead": True, "check_twist": True, "return_ancestry": False, "callback": None,
            "reference": None},
    "mh": {"move": "suffix", "mixture_weight": 0.5, "steps": 16, "burn_in": None, "thin": 1, "init_texts": None,
           "callback": None, "return_chains": False, "samples": "final"},
    "pgibbs": {"particles": 16, "steps": 16, "burn_in": None, "ess_threshold": 0.5, "twist": "auto", "proposal": "bootstrap",
               "lookahead": 8, "block_size": 1, "decode_ahead": True, "check_twist": True, "callback": None},
}  # fmt: skip
ADDED = {"pgibbs": {"thin": 1}}  # options added since: particle Gibbs thins like MH (the shared chains loop)


def test_api_contract_options_for_and_typed_info(post):
    """The contract lines of /work/shared/API.md, "typed method interface", exactly."""
    import dataclasses

    O = pst.samplers.options_for("smc")  # a frozen, torch-free dataclass: defaults, checks, help
    assert dataclasses.is_dataclass(O) and O.__dataclass_params__.frozen
    assert O().ess_threshold == 0.5 and "ESS" in O.help()["ess_threshold"]
    with pytest.raises(ValueError, match=r"^ess_threshold must be a finite number in \[0, 1\], got 2.0$"):
        O(ess_threshold=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        O().ess_threshold = 0.1
    res = post.sample(n=8, method="smc", max_new_tokens=T, seed=0)
    res.info["ess"], list(res.info.keys())
    assert res.info["ess"] is res.info.ess and torch.equal(res.info["ess"], res.ess)
    assert list(res.info.keys())[:4] == ["proposal", "twist", "resampling", "block_size"] and "ess" in res.info.keys()
    with pytest.raises((dataclasses.FrozenInstanceError, TypeError)):
        res.info["ess"] = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.info.ess = None


def test_options_for_is_torch_free_and_every_method_has_one():
    import subprocess
    import sys

    code = ("import sys, posterior as pst\n"
            "for m in ('is', 'bon', 'soft_bon', 'rejection', 'qrs', 'smc', 'mh', 'pgibbs'):\n"
            "    pst.samplers.options_for(m)()\n"
            "assert 'torch' not in sys.modules, 'options_for imported torch'\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("method", sorted(OLD_DEFAULTS))
def test_options_for_defaults_equal_the_old_table_and_every_check_names_its_field(method):
    from posterior.cli.options import check_method_options
    from posterior.samplers.options import METHOD_OPTIONS, check_option

    O = pst.samplers.options_for(method)
    assert O.method == method and O.defaults() == {**OLD_DEFAULTS[method], **ADDED.get(method, {})}
    assert {k: o.default for k, o in METHOD_OPTIONS[method].items()} == O.defaults()  # the table is a view of the class
    assert pst.samplers.sampler_options(method) == O.defaults()
    assert all(O.help()[k] for k in O.defaults())  # every option has its one-line help
    for name, opt in O.table().items():
        if opt.python_object:
            continue
        bad = "foo" if name == "twist" else []  # a list is no number, bool, choice or int
        with pytest.raises(ValueError) as lib:
            O(**{name: bad})
        message = str(lib.value)
        assert message.startswith(f"{name} must be") and repr(bad) in message, message
        with pytest.raises(ValueError) as table:
            check_option(method, name, bad)
        assert str(table.value) == message
        with pytest.raises(ValueError) as cli:
            check_method_options(method, [(name, bad)])
        assert str(cli.value) == f"method {method!r} option {message} (--option {name}={json.dumps(bad)})"


@pytest.mark.parametrize("method, bad", [("smc", {"ess_threshold": 1.5}), ("mh", {"thin": 0}), ("pgibbs", {"particles": 1}),
                                         ("bon", {"best_of": 0}), ("qrs", {"max_draws": -3})])  # fmt: skip
def test_library_cli_and_options_class_refuse_a_value_with_the_same_message(post, method, bad):
    from posterior.cli.options import check_method_options

    [(name, value)] = bad.items()
    with pytest.raises(ValueError) as cls:
        pst.samplers.options_for(method)(**bad)
    with pytest.raises(ValueError) as lib:
        post.sample(n=2, method=method, max_new_tokens=T, **bad)
    with pytest.raises(ValueError) as cli:
        check_method_options(method, [(name, value)])
    assert str(lib.value) == str(cls.value) and str(cli.value).startswith(f"method {method!r} option {cls.value}")


def test_burn_in_is_checked_against_steps_by_the_chains_options():
    for method in ("mh", "pgibbs"):
        O = pst.samplers.options_for(method)
        with pytest.raises(ValueError, match=r"^burn_in must be < steps=4, got 4$"):
            O(steps=4, burn_in=4)
        assert O(steps=9).burn_in_steps == 4 and O(steps=8, burn_in=4, thin=2).kept == (6, 8)


INFO_FIELDS = {  # method, options, fields that must be set
    "is": ({}, ("proposal", "ess")),
    "bon": ({}, ("best_of", "kl_bound")),
    "soft_bon": ({}, ("best_of",)),
    "rejection": ({"reward_upper_bound": 3.0}, ("acceptance_rate", "draws", "max_draws", "acceptances")),
    "qrs": ({}, ("log_bound", "acceptance_rate", "tv_estimate", "kl_estimate", "draws", "max_draws")),
    "smc": ({}, ("proposal", "twist", "resampling", "block_size", "ess_per_step", "resampled", "log_Z_increments")),
    "mh": ({"steps": 8}, ("move", "steps", "burn_in", "thin", "acceptance_rate", "r_hat", "mcmc_ess", "reward_trace")),
    "pgibbs": ({"particles": 4, "steps": 16, "thin": 2}, ("particles", "steps", "thin", "r_hat", "moved", "restarts")),
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(INFO_FIELDS))
def test_typed_info_reads_by_field_and_by_key(post, method):
    import dataclasses

    from posterior.results import Info
    from posterior.samplers.registry import get_method

    options, names = INFO_FIELDS[method]
    res = post.sample(n=8, method=method, max_new_tokens=T, seed=0, **options)
    info = res.info
    assert type(info) is get_method(method).info and isinstance(info, Info) and dataclasses.is_dataclass(info)
    for name in names:
        assert name in info and name in info.keys() and info[name] is getattr(info, name) is info.get(name)
        assert getattr(info, name) is not None
    assert set(info.keys()) <= {f.name for f in dataclasses.fields(info)} and len(info) == len(list(info))
    assert "nope" not in info and info.get("nope", 7) == 7
    with pytest.raises(KeyError):
        info["nope"]
    assert dict(info.items()) == {k: info[k] for k in info}
    assert info.replace(extra_entry=1)["extra_entry"] == 1 and "extra_entry" not in info  # a new info; this one unchanged
    assert torch.equal(info.ess, res.ess)  # written once, by make_result
    res.summary(), res.format_summary()  # both read the typed info
    if method == "pgibbs":
        assert info.thin == 2 and info.reward_trace.shape == (1, 16)


def test_a_hand_built_info_keeps_its_entries_as_keys_and_attributes():
    from posterior.results import Info

    info = Info.of({"x": [1, 2], "degenerate": None, "runs": "r"})
    assert info.x == [1, 2] and info["x"] == [1, 2] and list(info) == ["runs", "x"] and "degenerate" not in info
    with pytest.raises(AttributeError, match="has no field 'y'"):
        info.y


def test_a_toy_registered_method_runs_end_to_end(post, exact):
    """A new method is one Method(name, options, info, run): here self-normalised importance
    sampling from the prior with a checked option, reached through Posterior.sample, the CLI's
    option checks and options_for, and exact on the enumerable toy."""
    from dataclasses import dataclass

    from posterior.cli.options import check_method_options
    from posterior.results import Info
    from posterior.samplers.common import draw, make_result, tilted_weights
    from posterior.samplers.options import Options, integer, option
    from posterior.samplers.registry import SAMPLERS, Method, register

    @dataclass(frozen=True)
    class ToyOptions(Options):
        method = "toy_is"
        rounds: int = option(1, integer(1), "prior draws per sample")

    @dataclass(frozen=True, eq=False)
    class ToyInfo(Info):
        rounds: int | None = None

    def run(post, prompts, options, *, n, max_new_tokens, generator, progress=False):
        d = draw(post, prompts, n * options.rounds, max_new_tokens, generator=generator)
        tw = tilted_weights(d, post.beta, prompts, what="toy weights")
        return make_result(post, "toy_is", prompts, d.cont, log_prior=d.log_prior, rewards=d.rewards,
                           log_weights=tw.stats.log_weights, log_Z=tw.log_Z, ess=tw.stats.ess, kl=tw.kl, exact_scale=True,
                           info=ToyInfo(rounds=options.rounds))  # fmt: skip

    register(Method("toy_is", ToyOptions, ToyInfo, run))
    try:
        assert pst.samplers.options_for("toy_is") is ToyOptions and pst.samplers.sampler_options("toy_is") == {"rounds": 1}
        with pytest.raises(ValueError, match=r"^rounds must be a positive int, got 0$"):
            post.sample(n=2, method="toy_is", max_new_tokens=T, rounds=0)
        with pytest.raises(ValueError, match=r"method 'toy_is' option rounds must be a positive int, got 0 \(--option rounds=0\)"):
            check_method_options("toy_is", [("rounds", 0)])
        with pytest.raises(TypeError, match=r"method 'toy_is' has no option\(s\) \['steps'\]"):
            post.sample(n=2, method="toy_is", max_new_tokens=T, steps=3)
        res = post.sample(n=4000, method="toy_is", max_new_tokens=T, seed=1, rounds=2)
        assert isinstance(res.info, ToyInfo) and res.info["rounds"] == 2 and res.log_weights.shape == (1, 8000)
        assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), res.ess.item())
        assert abs(res.log_Z.item() - exact.log_Z) < 0.05
    finally:
        SAMPLERS.pop("toy_is", None)


def test_register_sampler_keeps_working_for_plain_functions(post):
    from posterior.samplers.registry import SAMPLERS, register_sampler

    @register_sampler("plain_bon")
    def plain(post, prompts, *, n, max_new_tokens, generator, progress=False, k: int = 3):
        return SAMPLERS["bon"](post, prompts, n=n, max_new_tokens=max_new_tokens, generator=generator, best_of=k)

    try:
        O = pst.samplers.options_for("plain_bon")
        assert O.defaults() == {"k": 3} and pst.samplers.sampler_options("plain_bon") == {"k": 3}
        res = post.sample(n=4, method="plain_bon", max_new_tokens=T, seed=0, k=2)
        assert res.info["best_of"] == 2
        with pytest.raises(TypeError, match=r"method 'plain_bon' has no option\(s\) \['best_of'\]"):
            post.sample(n=4, method="plain_bon", max_new_tokens=T, best_of=2)
    finally:
        SAMPLERS.pop("plain_bon", None)
