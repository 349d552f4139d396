"""Every foundation sampler against an enumerated posterior (fixed seeds, derived tolerances)."""

import itertools
import math

import pytest
import torch

import posterior as pst
from posterior.exact import empirical, exact_posterior, sequence_keys, total_variation
from posterior.samplers.rejection import qrs_estimates
from posterior.testing import markov_prior, two_token_prior

from conftest import tv_tolerance, tv_to_exact

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
