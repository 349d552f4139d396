"""Bad input raises ValueError (or a subclass) that names the bad value; nothing is clipped."""

import math

import pytest
import torch

import posterior as pst
from posterior.rewards import Callable, Contains, RewardError
from posterior.testing import tiny_hf_prior, two_token_prior
import numpy as np


@pytest.fixture
def prior():
    return two_token_prior()


def const(v):
    return Callable(lambda ts: [v] * len(ts), name=f"const{v}")


@pytest.mark.parametrize("beta", [0, -1.0, math.nan, math.inf, "0.5", True])
def test_beta_must_be_finite_positive(prior, beta):
    with pytest.raises(ValueError, match=rf"beta must be a finite number > 0, got {beta!r}".replace("(", r"\(")):
        pst.Posterior(prior, const(0.0), beta=beta)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_n_must_be_a_positive_int(prior, n):
    with pytest.raises(ValueError, match=f"n must be a positive int, got {n}"):
        pst.Posterior(prior, const(0.0), 1.0).sample(n=n)


def test_max_new_tokens_must_be_positive(prior):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        pst.Posterior(prior, const(0.0), 1.0).sample(n=2, max_new_tokens=0)


def test_wrong_length_rewards_name_the_reward(prior):
    post = pst.Posterior(prior, Callable(lambda ts: [0.0] * (len(ts) + 1), name="off_by_one"), 1.0)
    with pytest.raises(RewardError, match=r"off_by_one.*shape \(9,\) for 8 texts"):
        post.sample(n=8, max_new_tokens=2)


def test_nan_reward_names_the_text(prior):
    post = pst.Posterior(prior, Callable(lambda ts: [math.nan if t == "a" else 0.0 for t in ts], name="nanny"), 1.0)
    with pytest.raises(RewardError, match=r"Callable\(nanny\) returned nan for text 'a'"):
        post.sample(n=64, max_new_tokens=1)


def test_pos_inf_reward_is_an_error(prior):
    post = pst.Posterior(prior, const(math.inf), 1.0)
    with pytest.raises(RewardError, match="returned inf"):
        post.sample(n=4, max_new_tokens=1)


def test_raising_reward_names_the_offending_text(prior):
    def fragile(texts):
        return [1.0 / (len(t) - 1) for t in texts]  # ZeroDivisionError on one-letter texts

    post = pst.Posterior(prior, Callable(fragile), 1.0)
    with pytest.raises(RewardError, match=r"ZeroDivisionError.*on text '[ab]'"):
        post.sample(n=64, max_new_tokens=2)


def test_every_particle_at_neg_inf_raises_degenerate(prior):
    post = pst.Posterior(prior, Contains("zzz"), 1.0)
    with pytest.raises(pst.DegenerateWeightsError, match="<unconditional>"):
        post.sample(n=16, method="is", max_new_tokens=2)


def test_degenerate_error_names_the_prompt_and_keeps_rows():
    """After a prompt starting with "b" this prior never emits "a": only that prompt is degenerate."""
    free, no_a = torch.tensor([0.5, 0.3, 0.2]).log(), torch.tensor([0.0, 0.8, 0.2]).log()

    def next_logprobs(ids):
        return torch.stack([no_a if len(row) and row[0] == 1 else free for row in ids.tolist()] or [free])[: ids.shape[0]]

    post = pst.Posterior(pst.CallablePrior(["a", "b", "<eos>"], next_logprobs), Contains("a"), 1.0)
    with pytest.raises(pst.DegenerateWeightsError, match="'bb'") as e:
        post.sample(n=50, method="is", max_new_tokens=1, prompts=["ab", "bb"], seed=0)
    assert e.value.rows == [1]


@pytest.mark.parametrize("prompts, match", [([""], "prompt #0 is the empty string"), ([], "empty list"), ([3], "must be a str")])
def test_bad_prompts(prior, prompts, match):
    with pytest.raises(ValueError, match=match):
        pst.Posterior(prior, const(0.0), 1.0).sample(n=2, prompts=prompts)


def test_over_long_prompt_names_lengths():
    post = pst.Posterior(tiny_hf_prior("gpt2", context=64), const(0.0), 1.0)
    with pytest.raises(ValueError, match=r"has 60 tokens; with max_new_tokens=8 that exceeds the model's context of 64"):
        post.sample(n=2, max_new_tokens=8, prompts=["x" * 60])


def test_mismatched_tokenizers_are_refused():
    prior = two_token_prior()
    other = pst.CallablePrior(["a", "c", "<eos>"], lambda ids: torch.full((ids.shape[0], 3), 1 / 3).log())
    post = pst.Posterior(prior, const(0.0), 1.0)
    with pytest.raises(ValueError, match="different tokenizer/vocabulary"):
        post.sample(n=2, method="is", proposal=other)
    with pytest.raises(ValueError, match="different tokenizer/vocabulary"):
        pst.Posterior(tiny_hf_prior("gpt2"), const(0.0), 1.0).sample(n=2, proposal=prior)


def test_unknown_method_and_option(prior):
    post = pst.Posterior(prior, const(0.0), 1.0)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        post.sample(n=2, method="nope")
    with pytest.raises(TypeError, match=r"method 'is' has no option\(s\) \['best_of'\]"):
        post.sample(n=2, method="is", best_of=3)


def test_rejection_needs_a_true_upper_bound(prior):
    post = pst.Posterior(prior, Callable(lambda ts: [float(len(t)) for t in ts]), 1.0)
    with pytest.raises(ValueError, match="needs a finite reward_upper_bound"):
        post.sample(n=2, method="rejection", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"reward_upper_bound=1.0 is not an upper bound: reward 2 for text '(aa|ab|ba|bb)'"):
        post.sample(n=200, method="rejection", max_new_tokens=2, reward_upper_bound=1.0)


def test_rejection_gives_up_with_a_clear_error(prior):
    post = pst.Posterior(prior, Contains("aaaa"), 1.0)
    with pytest.raises(pst.DegenerateWeightsError, match=r"accepted 0 of \d+ draws .*short of n=4.*more than max_draws=40"):
        post.sample(n=4, method="rejection", max_new_tokens=2, reward_upper_bound=0.0, max_draws=40)


@pytest.mark.parametrize("best_of", [0, 1.5])
def test_best_of_must_be_positive_int(prior, best_of):
    with pytest.raises(ValueError, match=f"best_of must be a positive int, got {best_of}"):
        pst.Posterior(prior, const(0.0), 1.0).sample(n=2, method="bon", best_of=best_of)


def test_chat_without_template_is_refused():
    from posterior.testing import char_tokenizer

    with pytest.raises(ValueError, match="no chat template"):
        pst.HFPrior(tiny_hf_prior("gpt2").model, char_tokenizer(), chat=True)


@pytest.mark.parametrize("kw, match", [({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_modifiers(kw, match):
    with pytest.raises(ValueError, match=match):
        pst.CallablePrior(["a", "<eos>"], lambda ids: torch.zeros(ids.shape[0], 2).log_softmax(-1), **kw)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load a causal LM from"):
        pst.HFPrior.from_pretrained(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening.py (issue 11: numbers never silently wrong, inputs checked at the boundary); each test is named after what broke
# --------------------------------------------------------------------------------------------------
T = 3  # two_token_prior at max_new_tokens=3: 15 continuations; only "aaa" has three a's


def count_a(scale: float, *, prefixes: bool = False):
    return Callable(lambda ts: [scale * t.count("a") for t in ts], name=f"{scale:g}*count_a", accepts_prefixes=prefixes)


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


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening2.py (issue 19, hardening round two); each test is named after the failure it pins down
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), torch.tensor(3), 3])
def test_consistency_one_validator_module_accepts_numpy_and_torch_scalars_and_refuses_bools(value):
    from posterior.validate import check_int, check_prob, check_real, check_seed

    assert check_int("k", value, 1) == 3 and type(check_int("k", value, 1)) is int
    assert check_real("x", value, positive=True) == 3.0 and check_seed("seed", value) == 3
    for bad in (True, np.bool_(True), torch.tensor(True)):
        with pytest.raises(ValueError, match="k must be a positive int"):
            check_int("k", bad, 1)
        with pytest.raises(ValueError, match="x must be a finite number"):
            check_real("x", bad)
    assert check_prob("w", np.float32(0.25)) == 0.25
    with pytest.raises(ValueError, match=r"w must be a finite number in \[0, 1\], got 1.5"):
        check_prob("w", 1.5)
