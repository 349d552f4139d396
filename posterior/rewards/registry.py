"""Rewards by name, for the command line and configuration files: ``from_spec("contains:great")``.

A spec is ``NAME`` or ``NAME:ARGUMENT``; the factory registered under NAME parses ARGUMENT (which
may itself contain colons). Ensemble members are specs separated by commas (so a member spec
cannot itself hold a comma, nor be an ensemble). Register more with ``@register_reward("name")`` on a function
``factory(arg: str | None, *, prior) -> Reward``.

    sentiment                   VADER compound score in [-1, 1]
    negative-sentiment          -1 × sentiment
    contains:WORD               0 if WORD occurs, -inf otherwise
    classifier:PATH:LABEL       log p(LABEL | x) of a sequence classifier on disk (LABEL: name or index)
    classifier-logit:PATH:LABEL its logit
    similarity:TEXT             cosine similarity to TEXT (default MiniLM encoder)
    judge:QUESTION              log P(the prior answers " Yes" to QUESTION about x) (needs prior=)
    afinn                       AFINN-165 sentiment s/sqrt(s^2+15) in (-1, 1)
    textblob                    TextBlob polarity in [-1, 1] (textblob extra)
    length:WORDS[:COEF]         -COEF*max(0, words - WORDS) (COEF default 0.1)
    repetition[:N[:COEF]]       -COEF*fraction of repeated word N-grams (N 2, COEF 1)
    ensemble:MODE:SPEC,SPEC...  mean | wco (min) of the members' rewards
    ensemble:uwo:W:SPEC,SPEC... mean - W*population variance over the members
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the factories import their rewards (and torch) when called: names are checked without torch
    from posterior.rewards.base import Reward

RewardFactory = Callable[..., "Reward"]
REWARDS: dict[str, RewardFactory] = {}


def register_reward(name: str):
    """Register ``factory(arg, *, prior)`` under ``name`` (a lookup for :func:`from_spec`)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def deco(fn: RewardFactory) -> RewardFactory:
        REWARDS[name] = fn
        return fn

    return deco


def from_spec(spec: str, *, prior=None) -> Reward:
    """The reward a spec names (see the module docstring); ``prior`` is needed by ``judge:``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    name, sep, arg = spec.partition(":")
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r} in spec {spec!r}; registered: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](arg if sep else None, prior=prior)


def _need(name: str, arg: str | None, what: str) -> str:
    if not arg:
        raise ValueError(f"reward {name!r} needs an argument: {name}:{what}")
    return arg


def _none(name: str, arg: str | None) -> None:
    if arg is not None:
        raise ValueError(f"reward {name!r} takes no argument, got {name}:{arg}")


@register_reward("sentiment")
def _sentiment(arg, *, prior=None):
    from posterior.rewards.base import Sentiment

    _none("sentiment", arg)
    return Sentiment()


@register_reward("negative-sentiment")
def _negative_sentiment(arg, *, prior=None):
    from posterior.rewards.base import Sentiment

    _none("negative-sentiment", arg)
    return -1.0 * Sentiment()


@register_reward("contains")
def _contains(arg, *, prior=None):
    from posterior.rewards.base import Contains

    return Contains(_need("contains", arg, "WORD"))


def _classifier(name: str, output: str):
    def factory(arg, *, prior=None):
        from posterior.rewards.classifier import Classifier

        path, sep, label = _need(name, arg, "PATH:LABEL").rpartition(":")  # the path may hold colons
        if not sep or not path or not label:
            raise ValueError(f"reward {name!r} needs {name}:PATH:LABEL, got {name}:{arg}")
        return Classifier(path, label=label, output=output)

    return factory


register_reward("classifier")(_classifier("classifier", "log_prob"))
register_reward("classifier-logit")(_classifier("classifier-logit", "logit"))


@register_reward("similarity")
def _similarity(arg, *, prior=None):
    from posterior.rewards.similarity import Similarity

    return Similarity(_need("similarity", arg, "TEXT"))


@register_reward("judge")
def _judge(arg, *, prior=None):
    from posterior.rewards.judge import LMJudge

    question = _need("judge", arg, "QUESTION")
    if prior is None:
        raise ValueError(f"reward 'judge:{question}' asks the prior, so it needs from_spec(..., prior=prior)")
    return LMJudge(prior, question)


@register_reward("afinn")
def _afinn(arg, *, prior=None):
    from posterior.rewards.lexicon import Afinn

    _none("afinn", arg)
    return Afinn()


@register_reward("textblob")
def _textblob(arg, *, prior=None):
    from posterior.rewards.lexicon import TextBlob

    _none("textblob", arg)
    return TextBlob()


def _number(spec: str, what: str, text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what} in reward spec {spec!r} must be {'an int' if kind is int else 'a number'}, got {text!r}") from None


@register_reward("length")
def _length(arg, *, prior=None):
    from posterior.rewards.penalties import LengthPenalty

    spec = f"length:{arg}"
    parts = _need("length", arg, "WORDS[:COEF]").split(":")
    if len(parts) > 2:
        raise ValueError(f"reward spec {spec!r} has {len(parts)} arguments; length takes WORDS[:COEF]")
    kw = {"coef": _number(spec, "COEF", parts[1], float)} if len(parts) == 2 else {}
    return LengthPenalty(_number(spec, "WORDS", parts[0], int), **kw)


@register_reward("repetition")
def _repetition(arg, *, prior=None):
    from posterior.rewards.penalties import RepetitionPenalty

    if arg is None:
        return RepetitionPenalty()
    spec = f"repetition:{arg}"
    parts = arg.split(":")
    if len(parts) > 2:
        raise ValueError(f"reward spec {spec!r} has {len(parts)} arguments; repetition takes [N[:COEF]]")
    kw = {"coef": _number(spec, "COEF", parts[1], float)} if len(parts) == 2 else {}
    return RepetitionPenalty(_number(spec, "N", parts[0], int), **kw)


@register_reward("ensemble")
def _ensemble(arg, *, prior=None):
    from posterior.rewards.ensemble import MODES, Ensemble

    spec = f"ensemble:{arg}"
    mode, _, rest = _need("ensemble", arg, "MODE[:WEIGHT]:SPEC,SPEC,...").partition(":")
    if mode not in MODES:
        raise ValueError(f"ensemble mode {mode!r} in reward spec {spec!r} must be one of {', '.join(MODES)}")
    weight = None
    if mode == "uwo":
        text, _, rest = rest.partition(":")
        weight = _number(spec, "uwo WEIGHT", text, float)
    if not rest:
        raise ValueError(f"reward spec {spec!r} names no members; write ensemble:{mode}{':W' if mode == 'uwo' else ''}:SPEC,SPEC")
    members = []
    for part in rest.split(","):
        if part.startswith("ensemble"):
            raise ValueError(f"ensemble member {part!r} in reward spec {spec!r}: ensembles do not nest in a spec")
        try:
            members.append(from_spec(part, prior=prior))
        except ValueError as e:
            raise ValueError(f"ensemble member {part!r} in reward spec {spec!r}: {e}") from e
    return Ensemble(members, mode, uwo_weight=weight)
