"""Rewards: ``Sentiment`` (VADER), ``Contains`` (hard constraint), ``Callable`` (user function),
weighted sums of them (``0.5 * Sentiment() + Contains("great")``), TRL reward functions
(``from_trl``), more lexicons (``Afinn``, ``TextBlob``), penalties (``LengthPenalty``,
``RepetitionPenalty``), ensembles (``Ensemble``: mean / wco / uwo), model-based rewards
(``Classifier``, ``Similarity``, ``LMJudge``) and rewards by name (``from_spec("contains:great")``,
``register_reward``)."""

from posterior.rewards.base import (
    Callable,
    Contains,
    Reward,
    RewardError,
    Sentiment,
    WeightedSum,
    as_reward,
)
from posterior.rewards.classifier import Classifier
from posterior.rewards.ensemble import Ensemble
from posterior.rewards.judge import LMJudge
from posterior.rewards.lexicon import Afinn, TextBlob
from posterior.rewards.penalties import LengthPenalty, RepetitionPenalty
from posterior.rewards.registry import REWARDS, from_spec, register_reward
from posterior.rewards.similarity import Similarity
from posterior.rewards.trl import TRLReward, from_trl

__all__ = [
    "Afinn",
    "Callable",
    "Classifier",
    "Contains",
    "Ensemble",
    "LMJudge",
    "LengthPenalty",
    "REWARDS",
    "Reward",
    "RepetitionPenalty",
    "RewardError",
    "Sentiment",
    "Similarity",
    "TRLReward",
    "TextBlob",
    "WeightedSum",
    "as_reward",
    "from_spec",
    "from_trl",
    "register_reward",
]
