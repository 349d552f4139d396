"""Rewards: ``Sentiment`` (VADER), ``Contains`` (hard constraint), ``Callable`` (user function),
weighted sums of them (``0.5 * Sentiment() + Contains("great")``), TRL reward functions
(``from_trl``), more lexicons (``Afinn``, ``TextBlob``), penalties (``LengthPenalty``,
``RepetitionPenalty``), ensembles (``Ensemble``: mean / wco / uwo), model-based rewards
(``Classifier``, ``Similarity``, ``LMJudge``) and rewards by name (``from_spec("contains:great")``,
``register_reward``).

The names are imported on first use: ``posterior.rewards.REWARDS`` (the names ``--reward`` takes)
needs no torch."""

from posterior.lazy import lazy_names

# Ensemble modes (``posterior.rewards.ensemble``), here so that reward specs (``registry``) are
# checked without torch and the ensemble and the registry need not import each other.
ENSEMBLE_MODES = ("mean", "wco", "uwo")

__getattr__, __dir__ = lazy_names(__name__, {
    **dict.fromkeys(["Callable", "Contains", "Reward", "RewardError", "Sentiment", "WeightedSum", "as_reward"],
                    "posterior.rewards.base"),
    "Classifier": "posterior.rewards.classifier",
    "Ensemble": "posterior.rewards.ensemble",
    "LMJudge": "posterior.rewards.judge",
    "Afinn": "posterior.rewards.lexicon",
    "TextBlob": "posterior.rewards.lexicon",
    "LengthPenalty": "posterior.rewards.penalties",
    "RepetitionPenalty": "posterior.rewards.penalties",
    **dict.fromkeys(["REWARDS", "from_spec", "register_reward"], "posterior.rewards.registry"),  # no torch
    "Similarity": "posterior.rewards.similarity",
    "TRLReward": "posterior.rewards.trl",
    "from_trl": "posterior.rewards.trl",
})  # fmt: skip

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
