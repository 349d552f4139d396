"""Per-prompt random streams (posterior.streams): a prompt's sample is fixed by its own seed,
whatever it is batched with, and it is still a sample of the same posterior."""

import pytest
import torch

import posterior as pst
from conftest import count_a_reward, exact_posterior, tv_to_exact, tv_tolerance
from posterior.kernels import resample, tilted_sample
from posterior.streams import Streams, categorical
from posterior.testing import SequencePrior, markov_prior

PROMPTS = ["a", "bc", "abca", "c"]
SEEDS = [11, 22, 33, 44]
SUBSETS = ([1], [3, 0], [2, 1, 3])

CASES = [
    ("is", {}, 0.5),
    ("bon", {"best_of": 3}, 0.5),
    ("soft_bon", {"best_of": 3}, 0.5),
    ("smc", {}, 0.5),
    ("smc", {"proposal": "tilted"}, 0.5),
    ("smc", {"block_size": 2}, 0.5),
    ("smc", {"resampling": "systematic", "ess_threshold": 1.0}, 0.5),
    ("rejection", {"reward_upper_bound": 6.0}, 4.0),  # not batched: one run per prompt
    ("mh", {}, 0.5),
]


def _same(a, i, b, j) -> bool:
    T = min(a.tokens.shape[-1], b.tokens.shape[-1])
    return (
        a.texts[i] == b.texts[j]
        and torch.equal(a.lengths[i], b.lengths[j])
        and torch.equal(a.tokens[i][:, :T], b.tokens[j][:, :T])
        and torch.allclose(a.log_weights[i].double(), b.log_weights[j].double(), atol=1e-12, equal_nan=True)
    )


@pytest.mark.parametrize("method,options,beta", CASES, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, o, _ in CASES])
def test_a_prompts_sample_does_not_depend_on_what_it_is_batched_with(method, options, beta):
    post = pst.Posterior(markov_prior(), count_a_reward(1.0), beta)
    full = post.sample(n=8, method=method, max_new_tokens=6, prompts=PROMPTS, seed=SEEDS, **options)
    assert full.seed == SEEDS
    for idx in SUBSETS:
        part = post.sample(n=8, method=method, max_new_tokens=6, prompts=[PROMPTS[i] for i in idx], seed=[SEEDS[i] for i in idx], **options)
        for j, i in enumerate(idx):
            assert _same(full, i, part, j), (method, options, idx, i)
    batched = pst.samplers.get_method(method).streams
    assert (full.info.get("runs") is None) == batched  # stream methods run the prompts in one batch


def test_one_generator_for_all_prompts_does_depend_on_the_batch():
    """The control: with one seed, prompt 1's draws follow prompt 0's, so the property above is not
    a property of the toy."""
    post = pst.Posterior(markov_prior(), count_a_reward(1.0), 0.5)
    full = post.sample(n=8, method="smc", max_new_tokens=6, prompts=PROMPTS, seed=5)
    alone = post.sample(n=8, method="smc", max_new_tokens=6, prompts=[PROMPTS[1]], seed=5)
    assert not _same(full, 1, alone, 0)


def test_stopped_and_sequence_priors_keep_the_guarantee():
    """A stopped prior (stop strings, the server's) draws per-row streams; a prior without
    ROW_STREAMS (a sequence-level test prior) runs once per prompt instead: both keep it."""
    from posterior.priors.stop import stop_string_prior

    base = markov_prior()
    for prior, batched in ((stop_string_prior(base, stop=["ca"]), True), (SequencePrior(base), False)):
        post = pst.Posterior(prior, count_a_reward(1.0), 0.5)
        full = post.sample(n=6, method="smc", max_new_tokens=6, prompts=PROMPTS, seed=SEEDS)
        part = post.sample(n=6, method="smc", max_new_tokens=6, prompts=PROMPTS[2:], seed=SEEDS[2:])
        assert _same(full, 2, part, 0) and _same(full, 3, part, 1)
        assert (full.info.get("runs") is None) == batched


@pytest.mark.parametrize("method,options", [("is", {}), ("smc", {}), ("smc", {"proposal": "tilted", "block_size": 2})])
def test_per_prompt_streams_still_sample_the_posterior(method, options):
    """Law, not only reproducibility: 40 prompts (all the same, each its own seed) of 100 draws,
    pooled, match the enumerated pi* within 3 sigma."""
    prior, reward, beta, T = markov_prior(), count_a_reward(1.0), 1.0, 3
    exact = exact_posterior(prior, reward, beta, T, "ab")
    post = pst.Posterior(prior, reward, beta)
    res = post.sample(n=100, method=method, max_new_tokens=T, prompts=["ab"] * 40, seed=list(range(100, 140)), **options)
    # pool the weighted empiricals of the 40 prompts (each prompt's draws are independent of the others')
    from conftest import pooled_tv

    n_eff = float(res.ess.sum())
    assert pooled_tv(res, exact) <= tv_tolerance(exact.prob().values(), n_eff)


def test_categorical_with_streams_draws_the_given_probabilities():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3]]).expand(20000, 4)
    picks = categorical(probs, Streams.from_seeds(range(20000)))
    freq = torch.bincount(picks, minlength=4).double() / 20000
    assert freq[1] == 0  # a zero-probability index is never drawn
    assert torch.allclose(freq, probs[0].double(), atol=3 * (0.25 / 20000) ** 0.5)


def test_streams_rows_draw_only_from_their_own_entry():
    """for_rows: entry 0's children are the same whatever entry 1 has in the call."""
    a = Streams.from_seeds([1, 2]).for_rows([0, 0, 1])
    b = Streams.from_seeds([1, 9]).for_rows([1, 0, 1, 0, 1])
    u_a, u_b = a.uniform((3, 4)), b.uniform((5, 4))
    assert torch.equal(u_a[0], u_b[1]) and torch.equal(u_a[1], u_b[3])
    s = Streams.from_seeds([3, 4])
    assert torch.equal(s.take([1]).uniform((1, 2))[0], Streams.from_seeds([4]).uniform((1, 2))[0])


def test_bad_streams_and_seed_lists_are_refused_naming_the_value():
    post = pst.Posterior(markov_prior(), count_a_reward(1.0), 0.5)
    with pytest.raises(ValueError, match="seed is a list of 1 seeds but there are 2 prompts"):
        post.sample(n=2, max_new_tokens=2, prompts=["a", "b"], seed=[1])
    with pytest.raises(ValueError, match=r"seed\[1\] must be an int"):
        post.sample(n=2, max_new_tokens=2, prompts=["a", "b"], seed=[1, -3])
    with pytest.raises(ValueError, match="either generator or a list"):
        post.sample(n=2, max_new_tokens=2, prompts=["a"], seed=[1], generator=torch.Generator())
    with pytest.raises(ValueError, match="leading axis of 2"):
        Streams.from_seeds([1, 2]).uniform((3, 1))
    with pytest.raises(IndexError, match="row owner 2 is outside these 2 streams"):
        Streams.from_seeds([1, 2]).for_rows([0, 2])
    with pytest.raises(ValueError, match="torch backend only"):
        tilted_sample(torch.zeros(2, 3), generator=Streams.from_seeds([1, 2]), backend="triton")
    with pytest.raises(ValueError, match="torch backend only"):
        resample(torch.zeros(2, 3), 3, "multinomial", generator=Streams.from_seeds([1, 2]), backend="triton")


def test_hf_prior_keeps_the_guarantee_with_padded_batches():
    """On a (config-built) transformers model the prompts of a batch have different lengths (left
    padding, attention masks): a prompt's sample is still the one it gets alone."""
    from posterior.testing import tiny_hf_prior

    post = pst.Posterior(tiny_hf_prior("llama"), count_a_reward(1.0), 1.0)
    prompts = ["ab", "b", "aababab"]
    for method, opts in (("is", {}), ("smc", {}), ("smc", {"proposal": "tilted"})):
        full = post.sample(n=6, method=method, max_new_tokens=6, prompts=prompts, seed=[1, 2, 3], **opts)
        for idx in ([1], [2, 0]):
            part = post.sample(n=6, method=method, max_new_tokens=6, prompts=[prompts[i] for i in idx], seed=[[1, 2, 3][i] for i in idx], **opts)
            for j, i in enumerate(idx):
                assert full.texts[i] == part.texts[j], (method, idx)
                assert torch.allclose(full.log_weights[i], part.log_weights[j], atol=1e-4), (method, idx)
