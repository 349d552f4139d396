"""The stopped prior (posterior.priors.stop) on enumerable toys: its distribution is the base's with
every sequence cut where its text first holds a stop string (exact), and samplers draw from it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import tv_to_exact, tv_tolerance

import posterior as pst
from posterior.exact import enumerate_continuations, exact_posterior
from posterior.priors.callable import CallablePrior
from posterior.priors.stop import SequenceStopPrior, StepwiseStopPrior, check_stops, cut_at_stop, stop_string_prior

VOCAB = ["a", "b", "c", "<eos>"]  # "ab" as a stop string spans two tokens


def toy(probs=(0.35, 0.3, 0.25, 0.1)) -> CallablePrior:
    lp = torch.tensor(probs, dtype=torch.float64).log().float()
    return CallablePrior(VOCAB, lambda ids: lp.expand(ids.shape[0], -1))


def brute_stopped(base: CallablePrior, stops, T: int) -> dict[tuple[int, ...], float]:
    """The stopped prior by brute force: every base sequence of up to T tokens, cut after the token
    that completes a stop string (EOS appended if the budget has room), probabilities summed."""
    lp = base.next_logprobs(torch.zeros(1, 0, dtype=torch.long))[0].double()
    eos = len(VOCAB) - 1
    out: dict[tuple[int, ...], float] = {}
    for L in range(1, T + 1):
        for seq in itertools.product(range(len(VOCAB)), repeat=L):
            if eos in seq[:-1] or (L < T and seq[-1] != eos):
                continue  # not a complete base sequence
            prob = math.exp(float(lp[list(seq)].sum()))
            cut = seq
            for k in range(L):
                text = "".join(VOCAB[i] for i in seq[:k] if i != eos)
                if any(s in text for s in stops):
                    cut = seq[:k] + ((eos,) if k < T else ())
                    break
            out[cut] = out.get(cut, 0.0) + prob
    return out


@pytest.mark.parametrize("stops", [["ab"], ["c", "ba"], ["b"]])
def test_stopped_prior_enumerates_to_the_cut_base_distribution(stops):
    base, T = toy(), 5
    prior = stop_string_prior(base, stops)
    assert isinstance(prior, StepwiseStopPrior)
    seqs, log_prior = enumerate_continuations(prior, T, None)
    got = dict(zip(seqs, log_prior.exp().tolist()))
    want = brute_stopped(base, stops, T)
    assert set(got) == set(want)
    assert max(abs(got[k] - want[k]) for k in want) < 1e-6
    # token_log_probs (the base's scores, fixed up) agree with the decode-state distribution
    P, N = 1, len(seqs)
    tokens = torch.full((P, N, T), 3, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[0, i, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([[len(s) for s in seqs]])
    scored = prior.log_prob(prior.encode_prompts(None), tokens, lengths)[0].double()
    assert torch.allclose(scored, log_prior, atol=1e-5)
    # a sequence running past a stop string has probability 0 under the stopped prior
    past = torch.tensor([[[0, 1, 0, 3, 3]]]) if stops == ["ab"] else None
    if past is not None:
        assert prior.log_prob(prior.encode_prompts(None), past, torch.tensor([[4]])).item() == -math.inf


def test_stopped_text_is_cut_before_the_stop_string_and_rewards_see_it():
    prior = stop_string_prior(toy(), ["ab"])
    assert prior.decode([2, 0, 1, 2]) == "c" and prior.decode([2, 2]) == "cc"
    assert cut_at_stop("xxabyy", ["b", "ab"]) == ("xx", True)
    # the reward scores the stopped text: "ab" never reaches it
    exact = exact_posterior(prior, pst.rewards.Contains("b"), 0.5, 4)
    assert all("ab" not in t for t in exact.texts)


def test_samplers_draw_the_stopped_posterior():
    base, T, n = toy(), 4, 2000
    prior = stop_string_prior(base, ["ab"])
    reward = pst.rewards.Callable(lambda ts: [float(t.count("c")) for t in ts])
    exact = exact_posterior(prior, reward, 1.0, T)
    for method in ("is", "smc"):
        res = pst.Posterior(prior, reward, 1.0).sample(n=n, method=method, max_new_tokens=T, seed=0)
        n_eff = float(res.ess[0]) / (2 if method == "smc" else 1)
        assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), n_eff), method


def test_sequence_level_stop_prior_draws_the_same_distribution():
    """A prior without next-token distributions (an engine) is stopped by cutting its draws."""
    base, T, n = toy(), 4, 4000
    seq = SequenceStopPrior(base, ["ab"])
    want = brute_stopped(base, ["ab"], T)
    res = seq.sample(seq.encode_prompts(None), n, T, generator=torch.Generator().manual_seed(0))
    counts: dict = {}
    for s, L in zip(res.tokens[0].tolist(), res.lengths[0].tolist()):
        counts[tuple(s[:L])] = counts.get(tuple(s[:L]), 0) + 1 / n
    tv = 0.5 * sum(abs(counts.get(k, 0.0) - want.get(k, 0.0)) for k in set(counts) | set(want))
    assert tv < tv_tolerance(want.values(), n)
    assert torch.allclose(res.log_prob[0].double(), seq.log_prob(seq.encode_prompts(None), res.tokens, res.lengths)[0].double(), atol=1e-5)


def test_stop_token_ids_end_sequences_like_eos():
    prior = stop_string_prior(toy(), None, [2])  # "c" ends a sequence
    assert prior.eos_token_ids == (3, 2)
    seqs, lp = enumerate_continuations(prior, 3, None)
    assert all(2 not in s[:-1] and 3 not in s[:-1] for s in seqs)
    assert abs(float(lp.exp().sum()) - 1) < 1e-6


@pytest.mark.parametrize("stop,ids,says", [(["a"] * 5, None, "at most 4"), ([""], None, "non-empty"), (3, None, "string"),
                                           (None, [99], "token ids in"), (None, [True], "token ids in")])
def test_bad_stops_are_refused_naming_them(stop, ids, says):
    with pytest.raises(ValueError, match=says):
        check_stops(stop, ids, 4)


def brute_penalized(probs, prompt: list[int], T: int, min_tokens: int, rho: float) -> dict[tuple[int, ...], float]:
    """posterior.priors.penalties by hand: at each step the seen tokens' log-probs times rho, EOS
    banned before ``min_tokens`` tokens, renormalised; every sequence of up to T tokens."""
    base, eos = [math.log(p) for p in probs], len(VOCAB) - 1
    out: dict[tuple[int, ...], float] = {}
    for L in range(1, T + 1):
        for seq in itertools.product(range(len(VOCAB)), repeat=L):
            if eos in seq[:-1] or (L < T and seq[-1] != eos):
                continue
            total = 0.0
            for t, x in enumerate(seq):
                seen = set(prompt) | set(seq[:t])
                lp = [v * (rho if i in seen else 1.0) for i, v in enumerate(base)]
                if t < min_tokens:
                    lp[eos] = -math.inf
                norm = math.log(sum(math.exp(v) for v in lp))
                total += lp[x] - norm
            out[seq] = math.exp(total) if total > -math.inf else 0.0
    return {k: v for k, v in out.items() if v > 0}


@pytest.mark.parametrize("min_tokens,rho", [(2, 1.0), (0, 1.7), (3, 0.6)])
def test_penalized_prior_samples_and_scores_the_enumerated_law(min_tokens, rho):
    """min_tokens / repetition_penalty as a prior: the enumerated law (decode states) equals the
    hand computation, token_log_probs (scoring) equals it, and samples follow it (TV within 3 sigma)."""
    from posterior.exact import empirical, sequence_keys, total_variation
    from posterior.priors.penalties import PenalizedPrior, penalized_prior

    probs, T = (0.35, 0.3, 0.25, 0.1), 4
    prior = penalized_prior(toy(probs), min_tokens=min_tokens, repetition_penalty=rho)
    assert isinstance(prior, PenalizedPrior)
    prompt = prior.encode_prompts(["a"])
    seqs, log_prior = enumerate_continuations(prior, T, "a")
    got = {s: p for s, p in zip(seqs, log_prior.exp().tolist()) if p > 0}
    want = brute_penalized(probs, prompt[0], T, min_tokens, rho)
    assert set(got) == set(want) and max(abs(got[k] - want[k]) for k in want) < 1e-6
    assert all(len(s) > min_tokens for s in want if s[-1] == 3)  # no EOS before min_tokens
    tokens = torch.full((1, len(seqs), T), 3, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[0, i, : len(s)] = torch.tensor(s)
    scored = prior.log_prob(prompt, tokens, torch.tensor([[len(s) for s in seqs]]))[0].double()
    assert torch.allclose(scored.exp(), log_prior.exp(), atol=1e-6)
    n = 4000
    res = prior.sample(prompt, n, T, generator=torch.Generator().manual_seed(0))
    keys = sequence_keys(res.tokens, res.lengths)[0]
    tv = total_variation(empirical(keys), want)
    assert tv < tv_tolerance(list(want.values()), n), tv


def test_penalties_on_a_prior_without_next_token_distributions_are_refused():
    from posterior.priors.penalties import penalized_prior

    seq = SequenceStopPrior(toy(), ["c"])  # a sequence-level prior
    with pytest.raises(ValueError, match="next-token"):
        penalized_prior(seq, min_tokens=2)
    with pytest.raises(ValueError, match="repetition_penalty"):
        penalized_prior(toy(), repetition_penalty=0.0)


@pytest.mark.parametrize("base", ["markov", "hf"])
def test_penalized_prior_keeps_the_prior_contract(base):
    """start/extend/select/reorder, sampling == scoring, normalised rows: the Prior contract holds
    for the penalised prior over a step-wise toy and over an HF model (its KV cache)."""
    from posterior.priors.penalties import penalized_prior
    from posterior.testing import check_prior_conformance, markov_prior, tiny_hf_prior

    inner = markov_prior() if base == "markov" else tiny_hf_prior("llama")
    check_prior_conformance(penalized_prior(inner, min_tokens=2, repetition_penalty=1.5))
