"""Rewards: ``Sentiment`` (VADER), ``Contains`` (hard constraint), ``Callable`` (user function),
and weighted sums of them (``0.5 * Sentiment() + Contains("great")``)."""

from posterior.rewards.base import (
    Callable,
    Contains,
    Reward,
    RewardError,
    Sentiment,
    WeightedSum,
    as_reward,
)

__all__ = ["Callable", "Contains", "Reward", "RewardError", "Sentiment", "WeightedSum", "as_reward"]
