"""Priors by capability: every method on a prior with only the sequence-level capability (as a
serving engine), against the enumerated posterior of the step-wise prior behind it; block SMC's
log Z unbiased; the sequence-level methods of step-wise priors agree with their decode states."""

import math

import pytest
import torch
from conftest import pooled_tv, tv_tolerance

import posterior as pst
from posterior.exact import empirical, exact_posterior, sequence_keys, total_variation
from posterior.priors.base import StepwisePrior
from posterior.testing import SequencePrior, StreamingPrior, markov_prior, tiny_hf_prior

BETA = 0.5
T = 4


def score(texts):
    """+1 per "a", -0.5 per "b" (meaningful on prefixes, so it can be the twist)."""
    return [t.count("a") - 0.5 * t.count("b") for t in texts]


def posts(beta=BETA):
    reward = pst.rewards.Callable(score, accepts_prefixes=True)
    inner = markov_prior()
    return pst.Posterior(SequencePrior(inner), reward, beta=beta), exact_posterior(inner, reward, beta, T, prompt="a")


def test_sequence_prior_is_not_stepwise():
    post, _ = posts()
    assert not isinstance(post.prior, StepwisePrior) and isinstance(post.prior.inner, StepwisePrior)


@pytest.mark.parametrize("twist", [None, "auto"])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_block_smc_matches_enumerated_posterior(block, twist):
    """One continue_prefixes call per block (decode_ahead=False)."""
    post, exact = posts()
    P, N = 30, 100
    res = post.sample(n=N, method="smc", max_new_tokens=T, prompts=["a"] * P, seed=3, block_size=block, twist=twist,
                      ess_threshold=0.9, decode_ahead=False)
    assert bool(res.info["resampled"].any()) == (twist is not None)  # untwisted: reward deferred to the end
    assert post.prior.calls == math.ceil(T / block)  # one continue_prefixes call per block
    n_eff = res.ess.sum().item() / 2  # resampled particles are correlated: count half
    assert pooled_tv(res, exact) < tv_tolerance(exact.prob().values(), n_eff)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_decode_ahead_block_smc_matches_enumerated_posterior(block, threshold):
    """Decode-ahead (draw to the end, re-submit only duplicates after resampling) is block SMC."""
    post, exact = posts()
    P, N = 30, 100
    res = post.sample(n=N, method="smc", max_new_tokens=T, prompts=["a"] * P, seed=3, block_size=block, ess_threshold=threshold)
    assert bool(res.info["resampled"].any()) == (threshold > 0)
    if threshold == 0.5:  # a horizon of two blocks: the same law
        two = post.sample(n=N, method="smc", max_new_tokens=T, prompts=["a"] * P, seed=4, block_size=block,
                          ess_threshold=threshold, decode_ahead=2)
        assert pooled_tv(two, exact) < tv_tolerance(exact.prob().values(), two.ess.sum().item() / 2)
    if threshold == 0:  # never resampled: the adaptive horizon doubles (1, 2, 4, ... blocks)
        assert post.prior.calls <= 1 + math.ceil(math.log2(math.ceil(T / block)))
    n_eff = res.ess.sum().item() / 2  # resampled particles are correlated: count half
    assert pooled_tv(res, exact) < tv_tolerance(exact.prob().values(), n_eff)


@pytest.mark.parametrize("decode_ahead, threshold", [(False, 1.0), (True, 0.0), (True, 0.5), (True, 1.0), (2, 0.5)])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_block_smc_log_Z_is_unbiased(block, decode_ahead, threshold):
    """E[Ẑ] = Z within 3 standard errors over 200 independent runs of N = 16 (beta = 1)."""
    post, exact = posts(beta=1.0)
    runs = 200
    res = post.sample(n=16, method="smc", max_new_tokens=T, prompts=["a"] * runs, seed=7, block_size=block,
                      ess_threshold=threshold, decode_ahead=decode_ahead)
    ratio = (res.log_Z - exact.log_Z).exp()
    se = ratio.std() / math.sqrt(runs)
    assert abs(ratio.mean().item() - 1.0) < 3 * se.item(), (ratio.mean().item(), se.item())


class Recording(SequencePrior):
    """Records the rows and budgets of every continue_prefixes call."""

    def __init__(self, inner):
        super().__init__(inner)
        self.rows = []

    def continue_prefixes(self, prompt_ids, prefixes, max_tokens, *, generator=None):
        self.rows.append(len(prompt_ids))
        return super().continue_prefixes(prompt_ids, prefixes, max_tokens, generator=generator)


@pytest.mark.parametrize("block", [1, 2])
def test_decode_ahead_resubmits_only_the_duplicates(block):
    """With a horizon to the end: after the first call (every particle), each call holds only
    particles that are not the first offspring of their ancestor: at most N - (distinct ancestors)
    per resampling."""
    reward = pst.rewards.Callable(score, accepts_prefixes=True)
    prior = Recording(markov_prior())
    post = pst.Posterior(prior, reward, beta=BETA)
    P, N = 3, 50
    res = post.sample(n=N, method="smc", max_new_tokens=6, prompts=["a", "b", "c"], seed=0, block_size=block,
                      ess_threshold=1.0, return_ancestry=True, decode_ahead=6)  # 6 blocks: to the end
    assert prior.rows[0] == P * N
    anc, resampled = res.info["ancestry"], res.info["resampled"]
    bound = sum(N - len(set(anc[p, :, s].tolist())) for p in range(P) for s in range(anc.shape[2]) if resampled[p, s])
    assert 0 < sum(prior.rows[1:]) <= bound


# --- streams: continuations that keep running in the prior (a serving engine) ----------------------
def streaming_posts(beta=BETA, lag=0):
    reward = pst.rewards.Callable(score, accepts_prefixes=True)
    inner = markov_prior()
    return pst.Posterior(StreamingPrior(inner, lag=lag), reward, beta=beta), exact_posterior(inner, reward, beta, T, prompt="a")


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_streamed_block_smc_matches_enumerated_posterior(block, threshold):
    """Each particle's continuation submitted once and read block by block (the stream runs 2
    tokens ahead of what is read); after resampling only the duplicates start new ones."""
    post, exact = streaming_posts(lag=2)
    P, N = 30, 100
    res = post.sample(n=N, method="smc", max_new_tokens=T, prompts=["a"] * P, seed=3, block_size=block, ess_threshold=threshold)
    assert bool(res.info["resampled"].any()) == (threshold > 0)
    stream = post.prior.streams[-1]
    assert post.prior.calls == stream.calls and stream.open == 0  # everything went through the stream; all cancelled
    if threshold == 0:
        assert stream.submitted == P * N  # never resampled: one continuation per particle
    n_eff = res.ess.sum().item() / 2  # resampled particles are correlated: count half
    assert pooled_tv(res, exact) < tv_tolerance(exact.prob().values(), n_eff)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_streamed_block_smc_log_Z_is_unbiased(block, threshold):
    """E[Ẑ] = Z within 3 standard errors over 200 independent runs of N = 16 (beta = 1)."""
    post, exact = streaming_posts(beta=1.0, lag=1)
    runs = 200
    res = post.sample(n=16, method="smc", max_new_tokens=T, prompts=["a"] * runs, seed=7, block_size=block, ess_threshold=threshold)
    ratio = (res.log_Z - exact.log_Z).exp()
    se = ratio.std() / math.sqrt(runs)
    assert abs(ratio.mean().item() - 1.0) < 3 * se.item(), (ratio.mean().item(), se.item())


def test_streamed_samples_do_not_depend_on_how_far_the_stream_ran_ahead():
    """How much of a continuation the engine has drawn when SMC reads it is timing, not law: the
    same seed gives the same particles, weights and log Ẑ whether the stream shows exactly what
    was waited for or runs 3 tokens ahead."""
    out = []
    for lag in (0, 3):
        post, _ = streaming_posts(lag=lag)
        out.append(post.sample(n=12, method="smc", max_new_tokens=T, prompts=["a", "b"], seed=5, block_size=1, ess_threshold=1.0))
    a, b = out
    assert a.texts == b.texts and torch.equal(a.log_weights, b.log_weights) and torch.equal(a.log_Z, b.log_Z)


@pytest.mark.parametrize("block", [1, 2])
def test_stream_resubmits_only_the_duplicates(block):
    """After the first submissions (every particle), each resampling submits at most N - (distinct
    ancestors) continuations per prompt: survivors keep running, only copies start anew."""
    post, _ = streaming_posts()
    P, N = 3, 50
    res = post.sample(n=N, method="smc", max_new_tokens=6, prompts=["a", "b", "c"], seed=0, block_size=block,
                      ess_threshold=1.0, return_ancestry=True)  # fmt: skip
    anc, resampled = res.info["ancestry"], res.info["resampled"]
    bound = sum(N - len(set(anc[p, :, s].tolist())) for p in range(P) for s in range(anc.shape[2]) if resampled[p, s])
    stream = post.prior.streams[-1]
    assert 0 < stream.submitted - P * N <= bound and stream.open == 0


def test_a_failed_run_cancels_its_stream():
    """A reward that fails mid-run: the error reaches the caller and no continuation stays running."""
    calls = []

    def failing(texts):
        calls.append(len(texts))
        if len(calls) >= 2:  # the batch and, retried text by text, its first text
            raise RuntimeError("reward service down")
        return score(texts)

    prior = StreamingPrior(markov_prior())
    post = pst.Posterior(prior, pst.rewards.Callable(failing, accepts_prefixes=True), beta=BETA)
    with pytest.raises(pst.RewardError, match="reward service down"):
        post.sample(n=8, method="smc", max_new_tokens=T, prompts=["a"], seed=0, block_size=1, twist="auto")
    assert prior.streams[-1].submitted > 0 and prior.streams[-1].open == 0


def test_decode_ahead_false_or_a_fixed_horizon_does_not_stream():
    post, _ = streaming_posts()
    for ahead in (False, 2):
        post.sample(n=8, method="smc", max_new_tokens=T, prompts=["a"], seed=0, block_size=1, decode_ahead=ahead)
    assert post.prior.streams == [] and post.prior.calls > 0


def test_block_smc_log_Z_increments_sum_to_log_Z():
    post, _ = posts()
    for ahead in (False, True):
        res = post.sample(n=8, method="smc", max_new_tokens=T, prompts=["a", "bc"], seed=1, block_size=3, decode_ahead=ahead)
        if not ahead:
            assert res.info["ess_per_step"].shape[1] == 2  # blocks of 3 and 1 tokens
        assert torch.allclose(res.info["log_Z_increments"].sum(-1), res.log_Z, atol=1e-9)


def test_tilted_proposal_needs_a_stepwise_prior():
    post, _ = posts()
    with pytest.raises(ValueError, match="step-wise prior.*SequencePrior"):
        post.sample(n=4, method="smc", max_new_tokens=T, proposal="tilted")


@pytest.mark.parametrize("move", ["suffix", "independence", "mixture"])
def test_mh_on_a_sequence_prior_matches_enumerated_posterior(move):
    post, exact = posts()
    res = post.sample(n=400, method="mh", max_new_tokens=T, prompts=["a"], seed=11, move=move, steps=30)
    tv = total_variation(empirical(sequence_keys(res.tokens, res.lengths)[0]), exact.prob())
    assert tv < tv_tolerance(exact.prob().values(), 400 / 2), tv  # chains after 30 steps: half as good as iid
    ref = post.prior.log_prob(post.prior.encode_prompts(["a"]), res.tokens, res.lengths)
    assert torch.allclose(res.log_prior.double(), ref.double(), atol=1e-5)


def test_mh_from_init_texts_on_a_sequence_prior_scores_them():
    post, _ = posts()
    res = post.sample(n=2, method="mh", max_new_tokens=T, prompts=["a"], seed=0, steps=2, init_texts=[["ab", "c"]],
                      return_chains=True)
    chains = res.info["chains"]
    assert chains.texts[0][0] == ["ab", "c"]
    ref = post.prior.log_prob(post.prior.encode_prompts(["a"]), chains.tokens[0], chains.lengths[0])
    assert torch.allclose(chains.log_prior[0], ref.double(), atol=1e-6)


@pytest.mark.parametrize("method, options", [("is", {}), ("bon", {"best_of": 2}), ("soft_bon", {"best_of": 2}),
                                             ("rejection", {"reward_upper_bound": 4.0}), ("qrs", {})])
def test_every_other_method_runs_on_a_sequence_prior_like_on_its_inner_prior(method, options):
    """Sampling goes through continue_prefixes on both, so the same seed gives the same draws."""
    post, _ = posts(beta=4.0)  # rejection's bound 4 >= every reward accepts often at beta = 4
    inner = pst.Posterior(post.prior.inner, post.reward, beta=4.0)
    a = post.sample(n=6, method=method, max_new_tokens=T, prompts=["a", "b"], seed=5, **options)
    b = inner.sample(n=6, method=method, max_new_tokens=T, prompts=["a", "b"], seed=5, **options)
    assert a.texts == b.texts
    assert torch.allclose(a.log_weights, b.log_weights, atol=1e-6)


def test_stepwise_continue_prefixes_respects_budgets_eos_and_scores():
    prior = tiny_hf_prior("llama")
    prompts = prior.encode_prompts(["the cat", "a"])
    rows, prefixes, budget = [prompts[0], prompts[1], prompts[0]], [[5, 6], [], [7]], [3, 12, 1]
    ext = prior.continue_prefixes(rows, prefixes, budget, generator=torch.Generator().manual_seed(0))
    assert ext.tokens.shape[0] == 3 and (ext.lengths <= torch.tensor(budget)).all() and (ext.lengths >= 1).all()
    eos = prior.eos_token_ids[0]
    for b in range(3):
        seq = ext.tokens[b, : ext.lengths[b]].tolist()
        assert eos not in seq[:-1]  # stops after the first EOS
        assert (ext.tokens[b, ext.lengths[b]:] == eos).all()
        # each token's log-probability is the prior's, scored after prompt + prefix
        full = torch.tensor([[prefixes[b] + seq]])
        ref = prior.token_log_probs([rows[b]], full, torch.tensor([[len(prefixes[b]) + len(seq)]]))[0, 0]
        assert torch.allclose(ext.token_log_probs[b, : len(seq)], ref[len(prefixes[b]):], atol=1e-4)
    with pytest.raises(ValueError, match="max_tokens.*0"):
        prior.continue_prefixes(rows, prefixes, [3, 0, 1])


def test_token_log_probs_with_grad_carry_the_graph_and_equal_without():
    prior = tiny_hf_prior("gpt2")
    ids = prior.encode_prompts(["ab"])
    cont = prior.sample(ids, 3, 6, generator=torch.Generator().manual_seed(1))
    with_grad = prior.log_prob(ids, cont.tokens, cont.lengths, grad=True)
    assert with_grad.requires_grad
    with_grad.sum().backward()
    assert prior.model.get_output_embeddings().weight.grad is not None
    assert torch.allclose(with_grad.detach().cpu(), prior.log_prob(ids, cont.tokens, cont.lengths), atol=1e-5)


def test_budget_far_beyond_the_sequences_allocates_only_what_runs():
    """max_new_tokens of 10**6 on a prior that ends at once: tokens as wide as the longest sequence."""
    two = pst.testing.two_token_prior((0.01, 0.01, 0.98))
    post = pst.Posterior(two, score, beta=1.0)
    for method in ("is", "smc"):
        res = post.sample(n=4, method=method, max_new_tokens=10**6, seed=0)
        assert res.tokens.shape[-1] == int(res.lengths.max()) < 50


def test_smc_callback_streams_every_step():
    post, _ = posts()
    seen = []
    post.sample(n=5, method="smc", max_new_tokens=T, prompts=["a"], seed=0, block_size=2, callback=seen.append)
    assert [r.step for r in seen] == list(range(1, len(seen) + 1)) and seen[-1].tokens <= T
    assert all(len(r.texts[0]) == 5 and r.log_weights.shape == (1, 5) for r in seen)
    with pytest.raises(ValueError, match="callback"):
        post.sample(n=5, method="smc", max_new_tokens=T, callback=3)
