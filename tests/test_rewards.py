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
