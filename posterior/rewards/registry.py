"""Rewards by name, for the command line and configuration files: ``from_spec("contains:great")``.

A spec is ``NAME`` or ``NAME:ARGUMENT``; the factory registered under NAME parses ARGUMENT (which
may itself contain colons). Ensemble members are specs separated by commas (so a member spec
cannot itself hold a comma, nor be an ensemble). Register more with ``@register_reward("name")`` on a function
``factory(arg: str | None, *, prior) -> Reward``; give ``check=parse`` too (a torch-free function of
``arg`` raising ``ValueError``) and :func:`check_spec` checks the argument without building the
reward, as the command line does before anything loads.

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

from typing import TYPE_CHECKING, Any, Callable

from posterior.rewards import ENSEMBLE_MODES
from posterior.validate import check_int, check_real

if TYPE_CHECKING:  # the factories import their rewards (and torch) when called: specs are checked without torch
    from posterior.rewards.base import Reward

RewardFactory = Callable[..., "Reward"]
REWARDS: dict[str, RewardFactory] = {}
CHECKS: dict[str, Callable[[str | None], Any]] = {}  # torch-free argument parsers, where registered


def register_reward(name: str, *, check: Callable[[str | None], Any] | None = None):
    """Register ``factory(arg, *, prior)`` under ``name`` (a lookup for :func:`from_spec`);
    ``check(arg)``, if given, raises ``ValueError`` for a bad argument without importing torch."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def deco(fn: RewardFactory) -> RewardFactory:
        REWARDS[name] = fn
        if check is not None:
            CHECKS[name] = check
        else:
            CHECKS.pop(name, None)
        return fn

    return deco


def _split(spec) -> tuple[str, str | None]:
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    name, sep, arg = spec.partition(":")
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r} in spec {spec!r}; registered: {', '.join(sorted(REWARDS))}")
    return name, arg if sep else None


def check_spec(spec: str) -> None:
    """Raise ``ValueError`` for an unknown name or, where its factory registered a ``check``, a bad
    argument (ensembles: every member), importing no torch and loading nothing."""
    name, arg = _split(spec)
    if name in CHECKS:
        CHECKS[name](arg)


def spec_names(spec: str) -> list[str]:
    """The registered names a spec uses: its own and, for an ensemble, its members' (checked as
    :func:`check_spec` does); ``ValueError`` for an unknown name or a bad argument."""
    name, arg = _split(spec)
    if name != "ensemble":
        return [name]
    return [name] + [_split(part)[0] for part in _ensemble_arguments(arg)[2]]


def from_spec(spec: str, *, prior=None) -> Reward:
    """The reward a spec names (see the module docstring); ``prior`` is needed by ``judge:``."""
    name, arg = _split(spec)
    return REWARDS[name](arg, prior=prior)


def _need(name: str, arg: str | None, what: str) -> str:
    if not arg:
        raise ValueError(f"reward {name!r} needs an argument: {name}:{what}")
    return arg


def _no_argument(name: str):
    def parse(arg: str | None) -> dict:
        if arg is not None:
            raise ValueError(f"reward {name!r} takes no argument, got {name}:{arg}")
        return {}

    return parse


def _one_argument(name: str, what: str):
    return lambda arg: _need(name, arg, what)


@register_reward("sentiment", check=_no_argument("sentiment"))
def _sentiment(arg, *, prior=None):
    _no_argument("sentiment")(arg)
    from posterior.rewards.base import Sentiment

    return Sentiment()


@register_reward("negative-sentiment", check=_no_argument("negative-sentiment"))
def _negative_sentiment(arg, *, prior=None):
    _no_argument("negative-sentiment")(arg)
    from posterior.rewards.base import Sentiment

    return -1.0 * Sentiment()


@register_reward("contains", check=_one_argument("contains", "WORD"))
def _contains(arg, *, prior=None):
    word = _need("contains", arg, "WORD")
    from posterior.rewards.base import Contains

    return Contains(word)


def _classifier(name: str, output: str):
    def parse(arg: str | None) -> tuple[str, str]:
        path, sep, label = _need(name, arg, "PATH:LABEL").rpartition(":")  # the path may hold colons
        if not sep or not path or not label:
            raise ValueError(f"reward {name!r} needs {name}:PATH:LABEL, got {name}:{arg}")
        return path, label

    def factory(arg, *, prior=None):
        path, label = parse(arg)
        from posterior.rewards.classifier import Classifier

        return Classifier(path, label=label, output=output)

    register_reward(name, check=parse)(factory)


_classifier("classifier", "log_prob")
_classifier("classifier-logit", "logit")


@register_reward("similarity", check=_one_argument("similarity", "TEXT"))
def _similarity(arg, *, prior=None):
    text = _need("similarity", arg, "TEXT")
    from posterior.rewards.similarity import Similarity

    return Similarity(text)


@register_reward("judge", check=_one_argument("judge", "QUESTION"))
def _judge(arg, *, prior=None):
    question = _need("judge", arg, "QUESTION")
    if prior is None:
        raise ValueError(f"reward 'judge:{question}' asks the prior, so it needs from_spec(..., prior=prior)")
    from posterior.rewards.judge import LMJudge

    return LMJudge(prior, question)


@register_reward("afinn", check=_no_argument("afinn"))
def _afinn(arg, *, prior=None):
    _no_argument("afinn")(arg)
    from posterior.rewards.lexicon import Afinn

    return Afinn()


@register_reward("textblob", check=_no_argument("textblob"))
def _textblob(arg, *, prior=None):
    _no_argument("textblob")(arg)
    from posterior.rewards.lexicon import TextBlob

    return TextBlob()


def _number(spec: str, what: str, text: str, kind: type, **bounds):
    """``text`` as an int >= ``minimum`` or a finite float within ``bounds`` (``check_real``'s), named in ``spec``."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{what} in reward spec {spec!r} must be {'an int' if kind is int else 'a number'}, got {text!r}") from None
    name = f"{what} in reward spec {spec!r}"
    return check_int(name, value, bounds["minimum"]) if kind is int else check_real(name, value, **bounds)


def _penalty_arguments(name: str, arg: str | None, first: str, key: str, low: int, required: bool) -> dict:
    """``FIRST[:COEF]`` of ``length`` / ``repetition`` as the penalty's keyword arguments: ``key``
    the int FIRST >= ``low``, ``coef`` > 0 (none: the penalty's defaults; FIRST optional unless
    ``required``)."""
    spec = f"{name}:{arg}"
    if arg is None and not required:
        return {}
    parts = _need(name, arg, f"{first}[:COEF]").split(":")
    if len(parts) > 2:
        raise ValueError(f"reward spec {spec!r} has {len(parts)} arguments; {name} takes {'' if required else '['}{first}[:COEF]{'' if required else ']'}")
    kw = {key: _number(spec, first, parts[0], int, minimum=low)}
    if len(parts) == 2:
        kw["coef"] = _number(spec, "COEF", parts[1], float, positive=True)
    return kw


def _length_arguments(arg):
    return _penalty_arguments("length", arg, "WORDS", "max_words", 0, required=True)


def _repetition_arguments(arg):
    return _penalty_arguments("repetition", arg, "N", "n", 1, required=False)


@register_reward("length", check=_length_arguments)
def _length(arg, *, prior=None):
    kw = _length_arguments(arg)
    from posterior.rewards.penalties import LengthPenalty

    return LengthPenalty(**kw)


@register_reward("repetition", check=_repetition_arguments)
def _repetition(arg, *, prior=None):
    kw = _repetition_arguments(arg)
    from posterior.rewards.penalties import RepetitionPenalty

    return RepetitionPenalty(**kw)


def _ensemble_arguments(arg: str | None) -> tuple[str, float | None, list[str]]:
    """MODE, the uwo weight and the member specs, each member checked (:func:`check_spec`)."""
    spec = f"ensemble:{arg}"
    mode, _, rest = _need("ensemble", arg, "MODE[:WEIGHT]:SPEC,SPEC,...").partition(":")
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble mode {mode!r} in reward spec {spec!r} must be one of {', '.join(ENSEMBLE_MODES)}")
    weight = None
    if mode == "uwo":
        text, _, rest = rest.partition(":")
        weight = _number(spec, "uwo WEIGHT", text, float, minimum=0)
    if not rest:
        raise ValueError(f"reward spec {spec!r} names no members; write ensemble:{mode}{':W' if mode == 'uwo' else ''}:SPEC,SPEC")
    members = rest.split(",")
    for part in members:
        if part.startswith("ensemble"):
            raise ValueError(f"ensemble member {part!r} in reward spec {spec!r}: ensembles do not nest in a spec")
        try:
            check_spec(part)
        except ValueError as e:
            raise ValueError(f"ensemble member {part!r} in reward spec {spec!r}: {e}") from e
    return mode, weight, members


@register_reward("ensemble", check=_ensemble_arguments)
def _ensemble(arg, *, prior=None):
    mode, weight, parts = _ensemble_arguments(arg)
    from posterior.rewards.ensemble import Ensemble

    members = []
    for part in parts:
        try:
            members.append(from_spec(part, prior=prior))
        except ValueError as e:
            raise ValueError(f"ensemble member {part!r} in reward spec ensemble:{arg}: {e}") from e
    return Ensemble(members, mode, uwo_weight=weight)
