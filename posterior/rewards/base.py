"""Rewards r(x) on continuation texts, evaluated in batches and validated.

A reward maps a list of texts to one float per text; -inf is allowed (a hard constraint: the
posterior gives such texts probability 0), NaN and +inf are errors, as are wrong lengths. Errors
name the reward and the offending text. Rewards add and scale: ``0.5 * Sentiment() + Contains("x")``.
"""

from __future__ import annotations

import abc
import math
from typing import Callable as _Fn, Sequence

import torch


class RewardError(ValueError):
    """A reward returned something unusable (wrong length, NaN, +inf) or raised."""


class Reward(abc.ABC):
    """Base class: implement ``score(texts) -> Tensor[len(texts)]`` (or a list of floats)."""

    #: True when the reward is meaningful on partial texts (SMC may then use it as a twist).
    accepts_prefixes: bool = False
    #: True when the reward reads each text's prompt: samplers then score it through
    #: ``for_prompt(prompt, index)``, one prompt at a time (the per-prompt driver: ``posterior.samplers.drivers``).
    needs_prompts: bool = False
    #: R >= r(x) for every text, or None when unknown. Rejection sampling with this R gives exact
    #: samples of pi* (``pst.bounds`` uses it for the upper side of its brackets).
    upper_bound: float | None = None

    @abc.abstractmethod
    def score(self, texts: list[str]): ...

    @property
    def name(self) -> str:
        return repr(self)

    def for_prompt(self, prompt: str, index: int | None) -> "Reward":
        """This reward on continuations of ``prompt`` ("" when unconditional), as a reward of texts
        alone. ``index`` is the prompt's position in the sampled list (None outside a sampling run,
        e.g. ``Posterior.log_density``). A reward that does not read prompts returns itself."""
        return self

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Validated rewards of ``texts``: float64 tensor (len(texts),)."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, dtype=torch.float64)
        given = list(texts)  # the reward gets its own list: a reward that sorts or pops it is caught below
        try:
            out = self.score(given)
        except RewardError:
            raise
        except Exception as e:  # locate the text that breaks it
            for t in texts:
                try:
                    self.score([t])
                except Exception as e1:
                    raise RewardError(f"reward {self.name} raised {type(e1).__name__}: {e1} on text {t!r}") from e1
            raise RewardError(f"reward {self.name} raised {type(e).__name__}: {e} on a batch of {len(texts)} texts") from e
        if given != texts:  # its values could belong to other texts, or another order
            raise RewardError(
                f"reward {self.name} changed the list of texts it was given ({_first_change(texts, given)}); a reward "
                "must not modify its input: copy it first (texts = list(texts))"
            )
        try:
            out = torch.as_tensor(out, dtype=torch.float64).detach().cpu()
        except OverflowError:  # a Python int beyond float64 (|r| >= 2**1024)
            i = next((i for i, v in enumerate(out) if isinstance(v, int) and _overflows(v)), None) if isinstance(out, (list, tuple)) else None
            where = f" for text {texts[i]!r}" if i is not None and i < len(texts) else ""
            raise RewardError(f"reward {self.name} returned an int too large for a float{where} "
                              f"({_int_digits(out[i]) if where else 'over 1.8e308'}); rewards must be finite or -inf") from None  # fmt: skip
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardError(f"reward {self.name} returned {type(out).__name__}, not a list of floats: {e}") from e
        if out.shape != (len(texts),):
            raise RewardError(
                f"reward {self.name} returned shape {tuple(out.shape)} for {len(texts)} texts; expected ({len(texts)},)"
            )
        bad = torch.isnan(out) | torch.isposinf(out)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise RewardError(f"reward {self.name} returned {out[i].item()} for text {texts[i]!r}; rewards must be finite or -inf")
        return out

    # --- algebra -----------------------------------------------------------------------------------
    def __add__(self, other: "Reward") -> "WeightedSum":
        if not isinstance(other, Reward):
            return NotImplemented
        return WeightedSum(_terms(self) + _terms(other))

    def __mul__(self, weight: float) -> "WeightedSum":
        if not isinstance(weight, (int, float)):
            return NotImplemented
        return WeightedSum([(float(weight) * w, r) for w, r in _terms(self)])

    __rmul__ = __mul__


def _first_change(before: list[str], after: list) -> str:
    if len(after) != len(before):
        return f"{len(before)} texts became {len(after)}"
    i = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
    return f"text #{i} {before[i]!r} became {after[i]!r}"


def _overflows(v: int) -> bool:
    try:
        float(v)
    except OverflowError:
        return True
    return False


def _int_digits(v: int) -> str:
    return f"an int of {len(str(abs(v)))} digits" if abs(v) < 10**4000 else "an int of over 4000 digits"


def _terms(r: Reward) -> list[tuple[float, Reward]]:
    return list(r.terms) if isinstance(r, WeightedSum) else [(1.0, r)]


class WeightedSum(Reward):
    """r(x) = sum_k w_k r_k(x), weights finite and non-zero (a -inf term stays -inf for w > 0)."""

    def __init__(self, terms: Sequence[tuple[float, Reward]]):
        terms = list(terms)
        if not terms:
            raise ValueError("WeightedSum needs at least one (weight, reward) term")
        for w, r in terms:
            if not isinstance(r, Reward):
                raise ValueError(f"WeightedSum term {r!r} is not a Reward")
            if not (math.isfinite(w) and w != 0):
                raise ValueError(f"WeightedSum weight {w!r} for {r.name} must be finite and non-zero")
            if w < 0 and getattr(r, "can_be_neg_inf", False):
                raise ValueError(f"a negative weight {w} on {r.name}, which can be -inf, would give +inf rewards")
        self.terms = terms
        self.accepts_prefixes = all(r.accepts_prefixes for _, r in terms)
        self.needs_prompts = any(r.needs_prompts for _, r in terms)
        # sum_k w_k R_k bounds r when every weight is positive and every term has a bound
        bounded = all(w > 0 and r.upper_bound is not None for w, r in terms)
        self.upper_bound = sum(w * r.upper_bound for w, r in terms) if bounded else None

    def for_prompt(self, prompt, index):
        return WeightedSum([(w, r.for_prompt(prompt, index)) for w, r in self.terms]) if self.needs_prompts else self

    def score(self, texts):
        return sum(w * r(texts) for w, r in self.terms)

    def __repr__(self):
        return " + ".join(f"{w:g}*{r.name}" for w, r in self.terms)


class Sentiment(Reward):
    """VADER compound sentiment in [-1, 1] (Hutto & Gilbert 2014); lexicon ships with vaderSentiment."""

    accepts_prefixes = True
    upper_bound = 1.0

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, texts):
        return [self._analyzer.polarity_scores(t)["compound"] for t in texts]

    def __repr__(self):
        return "Sentiment()"


class Contains(Reward):
    """Hard constraint: 0 if ``substring`` occurs in the text, -inf otherwise."""

    can_be_neg_inf = True
    upper_bound = 0.0

    def __init__(self, substring: str, *, case_sensitive: bool = True):
        if not isinstance(substring, str) or not substring:
            raise ValueError(f"Contains needs a non-empty string, got {substring!r}")
        self.substring, self.case_sensitive = substring, case_sensitive

    def score(self, texts):
        s = self.substring if self.case_sensitive else self.substring.lower()
        return [0.0 if s in (t if self.case_sensitive else t.lower()) else -math.inf for t in texts]

    def __repr__(self):
        return f"Contains({self.substring!r})" + ("" if self.case_sensitive else " (case-insensitive)")


class Callable(Reward):
    """A user function ``fn(texts: list[str]) -> list[float] | Tensor`` called on whole batches."""

    can_be_neg_inf = True

    def __init__(
        self, fn: _Fn[[list[str]], object], *, name: str | None = None, accepts_prefixes: bool = False, upper_bound: float | None = None
    ):
        if not callable(fn):
            raise ValueError(f"Callable reward needs a callable, got {fn!r}")
        if upper_bound is not None and not (isinstance(upper_bound, (int, float)) and math.isfinite(upper_bound)):
            raise ValueError(f"upper_bound must be a finite number or None, got {upper_bound!r}")
        self.fn, self._name, self.accepts_prefixes = fn, name, accepts_prefixes
        self.upper_bound = None if upper_bound is None else float(upper_bound)

    def score(self, texts):
        return self.fn(texts)

    def __repr__(self):
        return f"Callable({self._name or getattr(self.fn, '__name__', 'fn')})"


def as_reward(r) -> Reward:
    """Accept a ``Reward`` or a plain function of texts."""
    if isinstance(r, Reward):
        return r
    if callable(r):
        return Callable(r)
    raise ValueError(f"reward must be a posterior.rewards.Reward or a function of texts, got {r!r}")
