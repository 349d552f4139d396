"""Penalties people add to a learned or lexicon reward (``Sentiment() + LengthPenalty(20)``).

Words are whitespace-separated tokens (``text.split()``); both penalties are <= 0 and exactly 0
on texts that do nothing wrong, so adding them leaves such texts' reward unchanged.

    LengthPenalty(max_words=L, coef=c):      r(x) = -c · max(0, words(x) - L)
    RepetitionPenalty(n=k, coef=c):          r(x) = -c · (1 - distinct / total)

over x's word k-grams (lower-cased); a text with fewer than k words has no k-grams and penalty 0.
``1 - distinct/total`` is the fraction of k-gram occurrences that repeat an earlier one (the
complement of distinct-k, Li et al. 2016, "A diversity-promoting objective function").
"""

from __future__ import annotations

import math

from posterior.rewards.base import Reward


def _check(name: str, value, *, kind: type, low: float, strict: bool = False):
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    ok = ok and math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite {kind.__name__} {op} {low:g}, got {value!r}")
    return kind(value)


class LengthPenalty(Reward):
    """-coef · max(0, words - max_words)."""

    accepts_prefixes = True  # a prefix's penalty never exceeds its completion's

    def __init__(self, max_words: int, coef: float = 0.1):
        self.max_words = _check("LengthPenalty max_words", max_words, kind=int, low=0)
        self.coef = _check("LengthPenalty coef", coef, kind=float, low=0, strict=True)

    def score(self, texts):
        return [-self.coef * max(0, len(t.split()) - self.max_words) + 0.0 for t in texts]  # + 0.0: no -0.0

    def __repr__(self):
        return f"LengthPenalty(max_words={self.max_words}, coef={self.coef:g})"


def repeated_fraction(text: str, n: int) -> float:
    """1 - distinct/total over the lower-cased word n-grams of ``text`` (0 without n-grams)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class RepetitionPenalty(Reward):
    """-coef · (fraction of repeated word n-grams)."""

    accepts_prefixes = True

    def __init__(self, n: int = 2, coef: float = 1.0):
        self.n = _check("RepetitionPenalty n", n, kind=int, low=1)
        self.coef = _check("RepetitionPenalty coef", coef, kind=float, low=0, strict=True)

    def score(self, texts):
        return [-self.coef * repeated_fraction(t, self.n) + 0.0 for t in texts]

    def __repr__(self):
        return f"RepetitionPenalty(n={self.n}, coef={self.coef:g})"


__all__ = ["LengthPenalty", "RepetitionPenalty", "repeated_fraction"]
