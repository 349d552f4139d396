import math

import pytest
import torch

from posterior.rewards import Callable, Contains, RewardError, Sentiment, WeightedSum


def test_sentiment_is_vader_compound():
    r = Sentiment()(["I love this wonderful movie", "This is terrible and awful", "The table"])
    assert r[0] > 0.5 and r[1] < -0.5 and r[2] == 0.0
    assert r.dtype == torch.float64 and Sentiment.accepts_prefixes


def test_contains_is_a_hard_constraint():
    assert Contains("great")(["a great day", "a good day", "Great"]).tolist() == [0.0, -math.inf, -math.inf]
    assert Contains("great", case_sensitive=False)(["Great"]).tolist() == [0.0]
    with pytest.raises(ValueError, match="non-empty string"):
        Contains("")


def test_callable_accepts_lists_and_tensors_and_neg_inf():
    assert Callable(lambda ts: torch.tensor([1.0, -math.inf]))(["x", "y"]).tolist() == [1.0, -math.inf]
    with pytest.raises(RewardError, match=r"returned shape \(\) for 1 texts"):
        Callable(lambda ts: 3.0)(["x"])
    with pytest.raises(RewardError, match="not a list of floats"):
        Callable(lambda ts: ["high"])(["x"])


def test_weighted_sum_algebra():
    r = 0.5 * Callable(lambda ts: [2.0] * len(ts), name="two") + Contains("x")
    assert isinstance(r, WeightedSum) and len(r.terms) == 2
    assert r(["x", "y"]).tolist() == [1.0, -math.inf]
    assert (2 * r)(["x"]).tolist() == [2.0]
    with pytest.raises(ValueError, match="negative weight"):
        -1.0 * Contains("x")
    with pytest.raises(ValueError, match="must be finite and non-zero"):
        WeightedSum([(math.nan, Sentiment())])
    assert not r.accepts_prefixes and (0.5 * Sentiment()).accepts_prefixes


def test_reward_returning_an_int_too_large_for_a_float_is_a_reward_error():
    """A Python int beyond float64 raised a bare OverflowError from torch (issue 25 item 11)."""
    with pytest.raises(RewardError, match=r"returned an int too large for a float for text 'b' \(an int of 401 digits\)"):
        Callable(lambda ts: [1.0, 10**400])(["a", "b"])
    with pytest.raises(RewardError, match="an int too large for a float"):
        Callable(lambda ts: [10**5000 for _ in ts])(["a"])
    assert Callable(lambda ts: [2**1000 for _ in ts])(["a"]).tolist() == [float(2**1000)]  # large but a float


def test_reward_that_mutates_its_input_list_is_a_reward_error():
    """A reward that sorted or popped the list it was given returned values for other texts (or a
    wrong count), silently paired with the caller's texts (issue 25 item 11)."""

    def sorts(ts):
        ts.sort()
        return [float(t == "a") for t in ts]

    def pops(ts):
        ts.pop()
        return [0.0] * (len(ts) + 1)

    with pytest.raises(RewardError, match=r"changed the list of texts it was given \(text #0 'b' became 'a'\)"):
        Callable(sorts)(["b", "a"])
    with pytest.raises(RewardError, match=r"changed the list of texts it was given \(2 texts became 1\)"):
        Callable(pops)(["b", "a"])
    texts = ["b", "a"]
    assert Callable(lambda ts: [float(t == "a") for t in ts])(texts).tolist() == [0.0, 1.0] and texts == ["b", "a"]
