"""Metropolis–Hastings (method="mh"): its three parts, its kernel, its chains, the HF prefix cache."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from conftest import count_a_reward

import posterior as pst
from posterior.exact import empirical, exact_posterior, sequence_keys, total_variation
from posterior.priors.base import StepwisePrior
from posterior.diagnostics.mcmc import reward_trace_diagnostics
from posterior.samplers import mh
from posterior.testing import markov_prior, tiny_hf_prior, two_token_prior
from posterior.rewards import Callable


def count_a(texts):
    return [float(t.count("a")) - 0.5 * len(t) for t in texts]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tv_tolerance(p: torch.Tensor, n: int, sigmas: float = 5.0) -> float:
    """E[TV] + sigmas·sd[TV] of the empirical distribution of n exact draws from p.

    Each cell's deviation is ≈ N(0, p(1-p)/n); |N(0, s²)| has mean s·sqrt(2/π) and variance
    s²(1 - 2/π); TV is half their sum (cells treated as independent).
    """
    s2 = p * (1 - p) / n
    mean = 0.5 * math.sqrt(2 / math.pi) * float(s2.sqrt().sum())
    sd = 0.5 * math.sqrt((1 - 2 / math.pi) * float(s2.sum()))
    return mean + sigmas * sd


# --------------------------------------------------------------------------------------------------
# log_acceptance_ratio
# --------------------------------------------------------------------------------------------------


def _random_pair(P=2, N=5, M=6, seed=0):
    """Two batches of sequences x, y with y_<cut == x_<cut, as per-token log-probs and lengths."""
    g = gen(seed)
    Lx = torch.randint(1, M + 1, (P, N), generator=g)
    cut = (torch.rand(P, N, generator=g) * Lx).floor().long()
    Ly = cut + 1 + (torch.rand(P, N, generator=g) * (M - cut)).floor().long()
    pos = torch.arange(M)
    lx = torch.where(pos < Lx[..., None], -torch.rand(P, N, M, generator=g) * 3, 0.0)
    ly = torch.where(pos < Ly[..., None], -torch.rand(P, N, M, generator=g) * 3, 0.0)
    ly = torch.where(pos < cut[..., None], lx, ly)  # shared prefix
    rx = torch.randn(P, N, generator=g, dtype=torch.float64)
    ry = torch.randn(P, N, generator=g, dtype=torch.float64)
    return lx, Lx, ly, Ly, cut, rx, ry


def test_log_acceptance_ratio_independence_is_reward_difference():
    lx, Lx, ly, Ly, cut, rx, ry = _random_pair()
    beta = 0.3
    ind = torch.ones_like(cut, dtype=torch.bool)
    fwd, rev = mh.proposal_log_densities(lx, Lx, ly, Ly, torch.zeros_like(cut), ind)
    assert torch.allclose(fwd, ly.double().sum(-1)) and torch.allclose(rev, lx.double().sum(-1))
    lt_x = lx.double().sum(-1) + rx / beta
    lt_y = ly.double().sum(-1) + ry / beta
    ratio = mh.log_acceptance_ratio(lt_x, lt_y, fwd, rev)
    assert ratio.dtype == torch.float64 and ratio.shape == (2, 5)
    torch.testing.assert_close(ratio, (ry - rx) / beta, atol=1e-9, rtol=0)


def test_log_acceptance_ratio_suffix_is_reward_difference_plus_length_ratio():
    lx, Lx, ly, Ly, cut, rx, ry = _random_pair(seed=1)
    beta = 0.7
    fwd, rev = mh.proposal_log_densities(lx, Lx, ly, Ly, cut, torch.zeros_like(cut, dtype=torch.bool))
    pos = torch.arange(lx.shape[-1])
    torch.testing.assert_close(fwd, -Lx.double().log() + torch.where(pos >= cut[..., None], ly.double(), 0.0).sum(-1))
    torch.testing.assert_close(rev, -Ly.double().log() + torch.where(pos >= cut[..., None], lx.double(), 0.0).sum(-1))
    ratio = mh.log_acceptance_ratio(lx.double().sum(-1) + rx / beta, ly.double().sum(-1) + ry / beta, fwd, rev)
    # the prior terms cancel; the uniform cut leaves log(L_x / L_y)
    expected = (ry - rx) / beta + Lx.double().log() - Ly.double().log()
    torch.testing.assert_close(ratio, expected, atol=1e-9, rtol=0)


def test_log_acceptance_ratio_outside_support():
    inf = math.inf
    cur = torch.tensor([[-inf, -inf, 0.0, 0.0]], dtype=torch.float64)
    new = torch.tensor([[1.0, -inf, -inf, 2.0]], dtype=torch.float64)
    zero = torch.zeros(1, 4, dtype=torch.float64)
    ratio = mh.log_acceptance_ratio(cur, new, zero, zero)
    assert ratio.tolist() == [[inf, 0.0, -inf, 2.0]]
    with pytest.raises(ValueError, match="NaN"):
        mh.log_acceptance_ratio(torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), inf), torch.full((1, 1), inf))


# --------------------------------------------------------------------------------------------------
# accept
# --------------------------------------------------------------------------------------------------


def test_accept_probability_is_min_one_exp_ratio():
    n = 20000
    ratio = torch.full((2, n), math.log(0.3), dtype=torch.float64)
    ratio[1] = 0.5  # > 0: always
    acc = mh.accept(ratio, generator=gen(3))
    assert acc.dtype == torch.bool and acc.shape == (2, n)
    assert bool(acc[1].all())
    rate = acc[0].double().mean().item()
    assert abs(rate - 0.3) < 3 * math.sqrt(0.3 * 0.7 / n)
    assert not bool(mh.accept(torch.full((1, 1000), -math.inf, dtype=torch.float64), generator=gen(0)).any())
    assert torch.equal(mh.accept(ratio, generator=gen(3)), acc)  # all randomness from the generator


# --------------------------------------------------------------------------------------------------
# propose
# --------------------------------------------------------------------------------------------------


def _state(prior, n=400, M=4, prompts=None, seed=0):
    post = pst.Posterior(prior, count_a, beta=1.0)
    prompt_ids = prior.encode_prompts(prompts)
    state = mh.init(post, prompt_ids, n, max_new_tokens=M, generator=gen(seed))
    rows = [prompt_ids[b // n] for b in range(len(prompt_ids) * n)]
    return post, prompt_ids, rows, state


def _check_scored(prior, prompt_ids, tokens, lengths, token_logprobs):
    ref = prior.log_prob(prompt_ids, tokens, lengths).double()
    torch.testing.assert_close(token_logprobs.double().sum(-1), ref, atol=1e-4, rtol=0)


def test_propose_suffix_keeps_prefix_and_cuts_uniformly():
    prior = markov_prior(("a", "b", "<eos>"))
    _, prompt_ids, rows, state = _state(prior, n=3000, M=4, prompts=["a", "ba"])
    cfg = mh.MHConfig(max_new_tokens=4, move="suffix")
    prop = mh.propose(prior, rows, state, config=cfg, generator=gen(1))
    P, N, M = state.tokens.shape
    assert prop.tokens.shape == (P, N, M) and prop.cut.shape == (P, N)
    assert not bool(prop.independence.any())
    assert bool((prop.cut >= 0).all()) and bool((prop.cut < state.lengths).all())
    assert bool((prop.lengths >= prop.cut + 1).all())  # at least one regenerated token
    pos = torch.arange(M)
    kept = pos < prop.cut[..., None]
    assert torch.equal(torch.where(kept, prop.tokens, 0), torch.where(kept, state.tokens, 0))
    assert torch.equal(torch.where(kept, prop.token_logprobs, 0), torch.where(kept, state.token_logprobs, 0))
    _check_scored(prior, prompt_ids, prop.tokens, prop.lengths, prop.token_logprobs)
    fwd, rev = mh.proposal_log_densities(state.token_logprobs, state.lengths, prop.token_logprobs, prop.lengths, prop.cut, prop.independence)
    assert torch.equal(fwd, prop.log_q_forward) and torch.equal(rev, prop.log_q_reverse)
    # cut ~ Uniform{0..L-1}: among chains of length 4, each cut has frequency 1/4 (3 sigma)
    sel = state.lengths == 4
    m = int(sel.sum())
    assert m > 500
    for c in range(4):
        f = float((prop.cut[sel] == c).double().mean())
        assert abs(f - 0.25) < 3 * math.sqrt(0.25 * 0.75 / m), (c, f)


def test_propose_independence_is_a_fresh_prior_draw():
    prior = markov_prior(("a", "b", "<eos>"))
    _, prompt_ids, rows, state = _state(prior, n=50, M=4)
    prop = mh.propose(prior, rows, state, config=mh.MHConfig(max_new_tokens=4, move="independence"), generator=gen(2))
    assert bool(prop.independence.all()) and bool((prop.cut == 0).all())
    torch.testing.assert_close(prop.log_q_forward, prop.token_logprobs.double().sum(-1))
    torch.testing.assert_close(prop.log_q_reverse, state.log_prior)
    _check_scored(prior, prompt_ids, prop.tokens, prop.lengths, prop.token_logprobs)


def test_propose_mixture_picks_independence_with_mixture_weight():
    prior = two_token_prior()
    _, _, rows, state = _state(prior, n=4000, M=3)
    w = 0.3
    prop = mh.propose(prior, rows, state, config=mh.MHConfig(max_new_tokens=3, move="mixture", mixture_weight=w), generator=gen(4))
    f = float(prop.independence.double().mean())
    assert abs(f - w) < 3 * math.sqrt(w * (1 - w) / 4000)
    assert bool((prop.cut[prop.independence] == 0).all())


def test_mh_config_validates():
    with pytest.raises(ValueError, match="'gibbs'"):
        mh.MHConfig(max_new_tokens=3, move="gibbs")
    with pytest.raises(ValueError, match="1.5"):
        mh.MHConfig(max_new_tokens=3, mixture_weight=1.5)


# --------------------------------------------------------------------------------------------------
# The kernel, enumerated: detailed balance and invariance of pi*
# --------------------------------------------------------------------------------------------------


def _token_logprobs(prior, seqs, M):
    out = torch.zeros(len(seqs), M, dtype=torch.float64)
    for i, s in enumerate(seqs):
        for t in range(len(s)):
            out[i, t] = prior.start([list(s[:t])]).logprobs[0, s[t]].double()
    return out


def enumerated_kernel(prior, reward, beta, M, proposal, mixture_weight=0.5):
    """K(x -> y) of one MH step on the whole support, accept/reject included.

    The proposal probabilities are computed here from the prior (cut probability 1/L_x times
    pi0(y_>=c | y_<c), or pi0(y) for independence moves); the acceptance probabilities come from
    ``mh.proposal_log_densities`` and ``mh.log_acceptance_ratio``. Rejected mass stays at x.
    """
    ex = exact_posterior(prior, reward, beta, M)
    seqs = ex.sequences
    lps = _token_logprobs(prior, seqs, M)  # (S, M)
    L = torch.tensor([len(s) for s in seqs])
    log_target = ex.log_prior + ex.rewards / beta
    S = len(seqs)
    K = torch.zeros(S, S, dtype=torch.float64)
    for i, x in enumerate(seqs):
        moves = []  # (probability of the component and cut, cut, independence)
        if proposal in ("suffix", "mixture"):
            w = 1.0 if proposal == "suffix" else 1.0 - mixture_weight
            moves += [(w / len(x), c, False) for c in range(len(x))]
        if proposal in ("independence", "mixture"):
            moves.append((1.0 if proposal == "independence" else mixture_weight, 0, True))
        for pm, c, ind in moves:
            for j, y in enumerate(seqs):
                if j == i or len(y) <= c or y[:c] != x[:c]:
                    continue
                q = math.exp(float(lps[j, c:].sum()))  # pi0(y_>=c | y_<c)
                fwd, rev = mh.proposal_log_densities(
                    lps[i].view(1, 1, M), L[i].view(1, 1), lps[j].view(1, 1, M), L[j].view(1, 1),
                    torch.tensor([[c]]), torch.tensor([[ind]]),
                )
                ratio = mh.log_acceptance_ratio(log_target[i].view(1, 1), log_target[j].view(1, 1), fwd, rev)
                K[i, j] += pm * q * math.exp(min(0.0, float(ratio)))
        K[i, i] = 1.0 - K[i].sum()
    return ex.log_posterior.exp(), K


@pytest.mark.parametrize("proposal", ["suffix", "independence", "mixture"])
def test_kernel_detailed_balance_enumerated(proposal):
    prior = two_token_prior()
    reward = pst.rewards.Callable(count_a)
    pi, K = enumerated_kernel(prior, reward, 0.5, 3, proposal, mixture_weight=0.3)
    assert K.shape == (15, 15) and bool((K >= 0).all())
    flow = pi[:, None] * K  # pi*(x) K(x, y)
    assert float((flow - flow.T).abs().max()) < 1e-10
    assert float((pi @ K - pi).abs().max()) < 1e-10
    assert float((K.sum(1) - 1).abs().max()) < 1e-12


def test_suffix_kernel_without_length_ratio_breaks_detailed_balance(monkeypatch):
    """Regression guard for the test itself: dropping the L_x / L_y correction must be caught."""
    right = mh.proposal_log_densities

    def no_length_ratio(lx, Lx, ly, Ly, cut, ind):
        fwd, rev = right(lx, Lx, ly, Ly, cut, ind)
        return fwd + Lx.double().log(), rev + Ly.double().log()

    monkeypatch.setattr(mh, "proposal_log_densities", no_length_ratio)
    pi, K = enumerated_kernel(two_token_prior(), pst.rewards.Callable(count_a), 0.5, 3, "suffix")
    flow = pi[:, None] * K
    assert float((flow - flow.T).abs().max()) > 1e-3


# --------------------------------------------------------------------------------------------------
# Chains against the enumerated posterior
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proposal", ["suffix", "independence", "mixture"])
def test_mh_final_states_match_enumerated_posterior(proposal):
    prior = markov_prior(("a", "b", "<eos>"))
    reward = pst.rewards.Callable(count_a)
    beta, M, n, prompts = 1.0, 3, 1000, ["a", "b"]
    post = pst.Posterior(prior, reward, beta=beta)
    # 30 steps: the enumerated kernels of this problem are within 2e-5 (TV) of pi* by then
    res = post.sample(n=n, method="mh", max_new_tokens=M, prompts=prompts, seed=11, move=proposal, steps=30)
    assert res.targets_posterior and res.log_Z is None
    assert torch.allclose(res.ess, torch.full((2,), float(n)))
    keys = sequence_keys(res.tokens, res.lengths)
    for p, prompt in enumerate(prompts):
        ex = exact_posterior(prior, reward, beta, M, prompt)
        tv = total_variation(empirical(keys[p]), ex.prob())
        assert tv < tv_tolerance(ex.log_posterior.exp(), n), (prompt, tv)
    torch.testing.assert_close(res.log_prior.double(), prior.log_prob(prior.encode_prompts(prompts), res.tokens, res.lengths).double(), atol=1e-4, rtol=0)


def test_chains_leave_states_outside_the_support():
    prior = two_token_prior()
    reward = pst.rewards.Contains("b")  # -inf without a "b"
    post = pst.Posterior(prior, reward, beta=1.0)
    init = [["a", "aa", "", "aaa"]]
    res = post.sample(n=4, method="mh", max_new_tokens=4, seed=0, steps=40, init_texts=init, return_chains=True)
    chains = res.info["chains"]
    assert chains.texts[0] == init
    assert bool(torch.isneginf(chains.rewards[0]).all())
    assert bool(torch.isfinite(res.rewards).all())
    assert all("b" in t for t in res.texts[0])


def test_all_chains_outside_the_support_raise():
    post = pst.Posterior(two_token_prior((0.98, 0.01, 0.01)), pst.rewards.Contains("bbbbbbbb"), beta=1.0)
    with pytest.raises(pst.DegenerateWeightsError, match="unconditional"):
        post.sample(n=2, method="mh", max_new_tokens=3, steps=2)


# --------------------------------------------------------------------------------------------------
# Options, returned chains, diagnostics
# --------------------------------------------------------------------------------------------------


def test_return_chains_and_samples_all():
    prior = markov_prior(("a", "b", "<eos>"))
    post = pst.Posterior(prior, count_a, beta=1.0)
    n, steps = 6, 9
    res = post.sample(n=n, method="mh", max_new_tokens=4, prompts=["a", "b"], seed=5, steps=steps, burn_in=3, thin=2,
                      return_chains=True, samples="all", move="mixture")
    ch = res.info["chains"]
    assert ch.tokens.shape == (steps + 1, 2, n, 4) and ch.accepted.shape == (steps, 2, n)
    assert ch.kept == (5, 7, 9)  # after burn-in, every 2nd counted back from the last
    assert "MHChains(states=10" in repr(ch)
    K = len(ch.kept)
    assert res.tokens.shape == (2, n * K, 4)
    for p in range(2):
        for i in range(n):
            for k, s in enumerate(ch.kept):
                assert res.texts[p][i * K + k] == ch.texts[s][p][i]
    # a rejected step leaves the chain where it was
    same = (ch.tokens[1:] == ch.tokens[:-1]).all(-1)  # (S, P, N)
    assert bool(same[~ch.accepted].all())
    torch.testing.assert_close(ch.log_prior[-1], prior.log_prob(prior.encode_prompts(["a", "b"]), ch.tokens[-1], ch.lengths[-1]).double(), atol=1e-4, rtol=0)
    info = res.info
    assert info["acceptance_rate"].shape == (2,) and info["acceptance_rate_per_chain"].shape == (2, n)
    torch.testing.assert_close(info["acceptance_rate_per_chain"], ch.accepted.double().mean(0))
    assert info["acceptance_by_cut"].shape == (2, len(info["acceptance_by_cut_bins"]))
    assert info["reward_trace"].shape == (2, steps + 1)
    assert info["mcmc_ess"].shape == (2,)
    # K = 3 kept states: split R-hat (needs 4) is undefined for the run, said so rather than NaN
    assert K == 3 and info["r_hat"] is None and "split R-hat needs >= 4 kept states per chain" in info["r_hat_note"]
    s = res.summary()
    for key in ("acceptance_rate", "acceptance_by_cut", "r_hat", "mcmc_ess", "ess"):
        assert key in s
    assert s["ess"] == [float(n * K)] * 2  # importance ESS of the uniform weights; mcmc_ess is separate
    res.format_summary()


def test_reward_trace_diagnostics():
    g = gen(0)
    iid = torch.randn(2, 8, 50, generator=g, dtype=torch.float64)
    iid[1, :, 10] = -math.inf
    r_hat, ess = reward_trace_diagnostics(iid)
    assert abs(float(r_hat[0]) - 1.0) < 0.05 and 200 < float(ess[0]) < 800
    assert math.isnan(float(r_hat[1])) and math.isnan(float(ess[1]))
    stuck = torch.randn(1, 4, 40, generator=g, dtype=torch.float64) + torch.arange(4.0)[None, :, None] * 5
    r_hat, ess = reward_trace_diagnostics(stuck)
    assert float(r_hat[0]) > 2.0  # chains that disagree are flagged
    r_hat, ess = reward_trace_diagnostics(iid[:, :, :3])
    assert math.isnan(float(r_hat[0])) and math.isfinite(float(ess[0]))  # split R-hat needs >= 4 samples


@pytest.mark.parametrize(
    "options, match",
    [
        ({"steps": 0}, "steps.*0"),
        ({"steps": 4, "burn_in": 4}, "burn_in.*4"),
        ({"burn_in": -1}, "burn_in.*-1"),
        ({"thin": 0}, "thin.*0"),
        ({"init_texts": [["a", "b"]]}, r"init_texts.*\[1\]\[3\]"),
        ({"init_texts": [["a", "b", "a"], ["a", "b", "a"]]}, "init_texts.*2 rows"),
        ({"init_texts": "ab"}, "init_texts.*str"),
        ({"init_texts": [["a", "b", 3]]}, r"init_texts\[0\]\[2\].*int"),
        ({"init_texts": [["a", "b", "aaaaaa"]]}, "aaaaaa.*max_new_tokens=3"),
        ({"move": "gibbs"}, "gibbs"),
        ({"mixture_weight": -0.1}, "-0.1"),
        ({"samples": "some"}, "some"),
    ],
)
def test_bad_input_raises_naming_the_value(options, match):
    post = pst.Posterior(two_token_prior(), count_a, beta=1.0)
    with pytest.raises(ValueError, match=match):
        post.sample(n=3, method="mh", max_new_tokens=3, **options)


# --------------------------------------------------------------------------------------------------
# HFPrior: the prefix cache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_truncate_and_merge_match_a_fresh_encode(arch):
    prior = tiny_hf_prior(arch)
    assert prior.reuses_prefix_cache
    prompts = prior.encode_prompts(["hello there, you", "a"])  # different lengths: left padding
    n, T = 3, 6
    B = 2 * n
    rows = [prompts[b // n] for b in range(B)]
    g = gen(0)
    state = prior.start(prompts, copies=n)
    toks = []
    for _ in range(T):
        tok = torch.multinomial(state.logprobs.exp(), 1, generator=g).squeeze(1)
        toks.append(tok)
        state = prior.extend(state, tok)
    tokens = torch.stack(toks, 1)  # (B, T)
    for keep in (torch.tensor([0, 1, 2, 3, 5, 6]), torch.zeros(B, dtype=torch.long), torch.full((B,), T)):
        cut = prior.truncate(state, rows, tokens, keep)
        fresh = StepwisePrior.truncate(prior, None, rows, tokens, keep)  # the default: encode the prefixes afresh
        assert torch.equal(cut.lengths, keep)
        torch.testing.assert_close(cut.logprobs, fresh.logprobs, atol=1e-4, rtol=0)
        # positions stay right when decoding continues from the truncated cache
        a, b = cut, fresh
        for _ in range(3):
            tok = torch.multinomial(a.logprobs.exp(), 1, generator=g).squeeze(1)
            a, b = prior.extend(a, tok), prior.extend(b, tok)
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
        # merge rows of two caches of different widths, then decode on
        take = torch.tensor([True, False, True, False, False, True])
        merged = prior.merge_rows(take, a, state)
        tok = torch.full((B,), 5)
        ref = torch.where(take[:, None], prior.extend(b, tok).logprobs, prior.extend(prior.select(state, torch.arange(B)), tok).logprobs)
        torch.testing.assert_close(prior.extend(merged, tok).logprobs, ref, atol=1e-4, rtol=0)
    # the input state is unchanged by truncate / merge_rows: truncating it again still works
    again = prior.truncate(state, rows, tokens, torch.full((B,), 2))
    torch.testing.assert_close(again.logprobs, StepwisePrior.truncate(prior, None, rows, tokens, torch.full((B,), 2)).logprobs, atol=1e-4, rtol=0)


def test_hf_truncate_unconditional_prompt():
    prior = tiny_hf_prior("llama")
    p = prior.encode_prompts(None)  # [BOS]: keep=0 re-feeds the only prompt token from an empty cache
    start = prior.start(p, copies=2)
    state = prior.extend(start, torch.tensor([4, 5]))
    cut = prior.truncate(state, p * 2, torch.tensor([[4], [5]]), torch.tensor([0, 1]))
    torch.testing.assert_close(cut.logprobs[0], start.logprobs[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(cut.logprobs[1], state.logprobs[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_chains_track_the_prior_log_prob(arch):
    prior = tiny_hf_prior(arch)
    post = pst.Posterior(prior, lambda ts: [float(t.count("e")) for t in ts], beta=0.5)
    prompts = ["the cat sat on", "a"]
    res = post.sample(n=4, method="mh", max_new_tokens=10, prompts=prompts, seed=0, steps=4, return_chains=True,
                      move="mixture")
    ref = prior.log_prob(prior.encode_prompts(prompts), res.tokens, res.lengths)
    torch.testing.assert_close(res.log_prior.double(), ref.double(), atol=1e-4, rtol=0)
    ch = res.info["chains"]
    for s in range(ch.tokens.shape[0]):
        ref = prior.log_prob(prior.encode_prompts(prompts), ch.tokens[s], ch.lengths[s])
        torch.testing.assert_close(ch.log_prior[s], ref.double(), atol=1e-4, rtol=0)
    assert bool(ch.accepted.any())  # the test exercised accepted moves (cache merges)


def test_hf_chains_start_from_init_texts():
    prior = tiny_hf_prior("gpt2")
    post = pst.Posterior(prior, lambda ts: [float(t.count("e")) for t in ts], beta=0.5)
    prompts = ["the cat sat on", "a"]
    init = [["hello", "e e e"], ["", "twelve chars"]]  # "twelve chars" has max_new_tokens tokens: no EOS
    res = post.sample(n=2, method="mh", max_new_tokens=12, prompts=prompts, seed=1, steps=2, init_texts=init,
                      return_chains=True)
    ch = res.info["chains"]
    assert ch.texts[0] == init
    assert ch.lengths[0].tolist() == [[6, 6], [1, 12]]
    ids = prior.encode_prompts(prompts)
    for s in range(3):
        torch.testing.assert_close(ch.log_prior[s], prior.log_prob(ids, ch.tokens[s], ch.lengths[s]).double(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# The default model (slow)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_sentiment_reward_rises_with_steps():
    prior = pst.load_default_prior()
    post = pst.Posterior(prior, pst.rewards.Sentiment(), beta=0.1)
    res = post.sample(n=8, method="mh", max_new_tokens=20, prompts=["The movie was"], seed=0, steps=12)
    trace = res.info["reward_trace"][0]  # (steps + 1,) mean reward over chains; 0 = prior draws
    print("reward trace:", [round(float(x), 3) for x in trace], "acceptance:", float(res.info["acceptance_rate"][0]))
    assert float(trace[-4:].mean()) > float(trace[0]) + 0.2
    assert float(res.reward_mean()[0]) > float(trace[0])


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening2.py (issue 19, hardening round two); each test is named after the failure it pins down
# --------------------------------------------------------------------------------------------------
T = 3  # two_token_prior at max_new_tokens=3: 15 continuations


count_a_h19 = functools.partial(count_a_reward, name="count_a")


def test_consistency_one_validator_module_mh_summary_says_why_r_hat_is_undefined():
    """One kept state per chain printed a bare NaN for R-hat."""
    post = pst.Posterior(two_token_prior(), count_a_h19(), beta=1.0)
    res = post.sample(n=4, method="mh", max_new_tokens=T, seed=0, steps=2, burn_in=1)
    assert res.info["r_hat"] is None and "split R-hat needs >= 4 kept states per chain; this run kept 1" in res.info["r_hat_note"]
    text = res.format_summary()
    assert "NaN" not in text and "R-hat          undefined   split R-hat needs >= 4 kept states per chain" in text
    assert res.summary()["r_hat"] is None


# --------------------------------------------------------------------------------------------------
# The chains loop shared with particle Gibbs (posterior.samplers.chains)
# --------------------------------------------------------------------------------------------------
def test_chains_loop_keeps_burn_in_and_thinning_and_diagnoses_the_kept_trace():
    from posterior.samplers.chains import run_chains
    from posterior.samplers.options import MHOptions

    g = gen(3)
    init = torch.zeros(2, 4, dtype=torch.float64)  # (P, N) a random walk per chain: the state is its reward

    def step(state, s):
        return state + torch.randn(state.shape, generator=g, dtype=torch.float64), s

    seen = []
    o = MHOptions(steps=12, burn_in=3, thin=2)
    run = run_chains(init, step, o, rewards=lambda st: st, initial_rewards=init, keep=lambda st: st.clone(),
                     on_step=lambda s, st: seen.append(s))  # fmt: skip
    assert o.kept == (4, 6, 8, 10, 12) and seen == list(range(1, 13)) and [i for i in run.infos] == seen
    assert run.trace.shape == (2, 4, 13) and torch.equal(run.trace[..., 0], init) and torch.equal(run.state, run.trace[..., 12])
    assert [torch.equal(k, run.trace[..., s]) for k, s in zip(run.kept, o.kept)] == [True] * 5
    r_hat, ess = reward_trace_diagnostics(run.trace[..., list(o.kept)])
    assert torch.equal(run.r_hat, r_hat) and torch.equal(run.mcmc_ess, ess) and run.notes == {}
    fields = run.info_fields(o)
    assert (fields["steps"], fields["burn_in"], fields["thin"]) == (12, 3, 2) and fields["reward_trace"].shape == (2, 13)
    short = run_chains(init, step, MHOptions(steps=4, burn_in=2), rewards=lambda st: st)  # 2 kept: no split R-hat
    assert set(short.notes) == {"r_hat"} and "split R-hat needs >= 4 kept states per chain; this run kept 2" in short.notes["r_hat"]
    assert short.info_fields(MHOptions(steps=4, burn_in=2))["r_hat"] is None
    assert short.trace.shape == (2, 4, 4)  # no initial rewards: one column per step


def test_mh_r_hat_is_the_chains_loop_diagnostic_of_its_kept_states():
    post = pst.Posterior(markov_prior(), pst.rewards.Callable(count_a), beta=0.5)
    res = post.sample(n=6, method="mh", max_new_tokens=4, seed=0, steps=10, burn_in=2, thin=2, return_chains=True)
    chains = res.info.chains
    assert chains.kept == (4, 6, 8, 10) and (res.info.steps, res.info.burn_in, res.info.thin) == (10, 2, 2)
    r_hat, ess = reward_trace_diagnostics(chains.rewards[list(chains.kept)].permute(1, 2, 0))
    assert torch.equal(res.info.r_hat, r_hat) and torch.equal(res.info.mcmc_ess, ess)
