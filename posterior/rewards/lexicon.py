"""Offline lexicon sentiment scorers besides VADER, so a proxy and a gold reward can be two
different real scorers. Both read only files their packages install (no download at run time).

* :class:`Afinn`: the AFINN-165 English word list (Nielsen 2011, "A new ANEW: evaluation of a word
  list for sentiment analysis in microblogs"; package ``afinn``): each listed word scores an integer
  valence in [-5, 5] and ``Afinn().score`` sums them, unbounded. We report it on VADER's scale,

      r(x) = s / sqrt(s^2 + 15),    s = sum of the AFINN valences of x's words,

  the normalisation VADER applies to its own sum (Hutto & Gilbert 2014, alpha = 15): in (-1, 1),
  0 for no sentiment words, odd and increasing in s, so the two scorers are on one scale.
* :class:`TextBlob`: TextBlob's pattern-lexicon polarity in [-1, 1] (adjective polarities
  averaged, with intensifiers and negation; ``textblob`` package, its ``en-sentiment.xml`` ships
  with it; the NLTK corpora TextBlob uses for other features are not needed).
"""

from __future__ import annotations

import math

from posterior.rewards.base import Reward

AFINN_ALPHA = 15.0  # VADER's normalisation constant: s / sqrt(s^2 + alpha)


def afinn_normalise(s: float, alpha: float = AFINN_ALPHA) -> float:
    """s / sqrt(s^2 + alpha): a summed valence mapped into (-1, 1)."""
    return s / math.sqrt(s * s + alpha)


class Afinn(Reward):
    """AFINN-165 sentiment, normalised to (-1, 1) as s / sqrt(s^2 + 15) (see the module docstring)."""

    accepts_prefixes = True

    def __init__(self):
        from afinn import Afinn as _Afinn

        self._afinn = _Afinn(language="en")

    def raw(self, text: str) -> float:
        """The unnormalised AFINN sum of valences of ``text``."""
        return float(self._afinn.score(text))

    def score(self, texts):
        return [afinn_normalise(self.raw(t)) for t in texts]

    def __repr__(self):
        return "Afinn()"


class TextBlob(Reward):
    """TextBlob's pattern-lexicon polarity in [-1, 1] (needs the ``textblob`` extra)."""

    accepts_prefixes = True

    def __init__(self):
        try:
            from textblob.en.sentiments import PatternAnalyzer
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "pst.rewards.TextBlob needs the textblob package: pip install 'posterior-align[textblob]'"
            ) from e
        self._analyzer = PatternAnalyzer()

    def score(self, texts):
        return [float(self._analyzer.analyze(t).polarity) for t in texts]

    def __repr__(self):
        return "TextBlob()"


__all__ = ["AFINN_ALPHA", "Afinn", "TextBlob", "afinn_normalise"]
