"""The text of an SMC run that can no longer change: what ``stream: true`` sends as it is fixed.

Why a prefix is fixed. Let A_t be the particles with finite weight after step t. Resampling only
copies particles with finite weight, and a particle with weight 0 stays at weight 0 until it is
overwritten by such a copy; so every particle alive at a later step t' > t descends (by ancestry)
from a particle in A_t, and its tokens extend that ancestor's tokens. Hence the longest common
prefix P_t of the texts in A_t starts the text of every particle alive at any later step, the final
particles with finite weight included — no later resampling can change it (the prefix property of
the "genealogy" of a particle system: Del Moral 2004, "Feynman-Kac Formulae", ch. 3; Jacob, Murray
& Rubenthaler 2015 bound how far back the common ancestor lies).

A slot i whose particle has weight 0 at step t either keeps its text T_i to the end or is
overwritten by a descendant of A_t, whose text starts with P_t; both start with lcp(T_i, P_t).
So the text of final choice i is known to start with

    C_i(t) = P_t                  if particle i has finite weight after step t,
             lcp(T_i(t), P_t)     otherwise,

and C_i(t) only grows with t (P_t+1 extends P_t). ``stream: true`` sends C_i(t) - C_i(t-1) as the
delta of choice i, so the deltas concatenate to the final text of every choice.

Texts versus tokens. The argument holds for token sequences; a sampler reports decoded texts
(``StepReport.texts``). Decoding a token prefix gives a prefix of the decoded whole except at the
end: a token that stops inside a multi-byte character decodes to U+FFFD, and a tokenizer that
"cleans up tokenization spaces" rewrites " ." to "." and " n't" to "n't" once the next token is
there. :func:`stable_text` holds such an unfinished end back before any prefix is taken, and
also an end that may be the start of a stop string (the stopped prior's text is cut before it).

Choices drawn from the population. A served SMC request's choices are drawn by weight from the
final particles with positive weight, each of which starts with P_t; so every choice of a prompt
is known to start with P_t (:meth:`PrefixTracker.update_shared`).
"""

from __future__ import annotations

import math
import os

# Longest pattern transformers' clean_up_tokenization rewrites (" n't", " 've", " 're"): an
# unfinished one at the end of a partial text is at most this long.
_CLEANUP_HOLD = 4


def common_prefix(texts: list[str]) -> str:
    """Longest common prefix of ``texts`` ("" for none)."""
    return os.path.commonprefix(list(texts)) if texts else ""


def stable_text(text: str, *, cleans_spaces: bool, stops=()) -> str:
    """The part of a partial continuation's text that decoding more tokens cannot change: without
    trailing U+FFFD (an unfinished multi-byte character), without its last few characters when
    the tokenizer cleans up tokenization spaces (an unfinished " n't"), and without an end that
    begins a stop string (more tokens may complete it, and the text is then cut before it)."""
    text = text.rstrip("\ufffd")
    if cleans_spaces:
        text = text[: max(0, len(text) - _CLEANUP_HOLD)]
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


def shared_prefix(texts: list[str], log_weights: list[float], *, cleans_spaces: bool, stops=()) -> str:
    """P_t of the module docstring: the common prefix of the stable texts of the particles with
    finite weight."""
    return common_prefix([stable_text(t, cleans_spaces=cleans_spaces, stops=stops) for t, w in zip(texts, log_weights) if w > -math.inf])


def fixed_prefixes(texts: list[str], log_weights: list[float], *, cleans_spaces: bool) -> list[str]:
    """C_i(t) of the module docstring for the N particles of one prompt after one step.

    Parameters
    ----------
    texts : N partial texts (particle i's text after the step)
    log_weights : N log-weights (-inf: weight 0)

    Returns N strings, each a prefix of the final text of choice i.
    """
    stable = [stable_text(t, cleans_spaces=cleans_spaces) for t in texts]
    alive = [w > -math.inf for w in log_weights]  # finite weight (NaN never reaches here: samplers raise)
    shared = common_prefix([s for s, a in zip(stable, alive) if a])
    return [shared if a else common_prefix([s, shared]) for s, a in zip(stable, alive)]


class PrefixTracker:
    """What has been sent for each choice of one request; ``update`` returns the new deltas.

    ``sent[i]`` only grows; a candidate that does not extend it (which the argument above rules
    out) is ignored rather than sent, so the concatenated deltas always stay a prefix of what was
    computed."""

    def __init__(self, num_choices: int, *, cleans_spaces: bool, stops=()):
        self.sent = [""] * num_choices
        self.cleans_spaces, self.stops = cleans_spaces, tuple(stops)

    def update_shared(self, offset: int, count: int, texts: list[str], log_weights: list[float]) -> dict[int, str]:
        """Deltas for ``count`` choices (from ``offset``) drawn from one prompt's final particles:
        each is known to start with the particles' shared prefix."""
        shared = shared_prefix(texts, log_weights, cleans_spaces=self.cleans_spaces, stops=self.stops)
        out = {}
        for k in range(offset, offset + count):
            if len(shared) > len(self.sent[k]) and shared.startswith(self.sent[k]):
                out[k] = shared[len(self.sent[k]) :]
                self.sent[k] = shared
        return out

    def update(self, offset: int, texts: list[str], log_weights: list[float]) -> dict[int, str]:
        """Deltas {choice index: new text} for the particles of one prompt, whose choices start at
        ``offset``."""
        out = {}
        for i, c in enumerate(fixed_prefixes(texts, log_weights, cleans_spaces=self.cleans_spaces)):
            k = offset + i
            if len(c) > len(self.sent[k]) and c.startswith(self.sent[k]):
                out[k] = c[len(self.sent[k]) :]
                self.sent[k] = c
        return out

    def rest(self, index: int, final_text: str) -> str | None:
        """The final delta of choice ``index``: what its final text adds to what was sent, or None
        if the final text does not start with what was sent (a broken invariant, reported)."""
        sent = self.sent[index]
        if not final_text.startswith(sent):
            return None
        self.sent[index] = final_text
        return final_text[len(sent) :]


__all__ = ["PrefixTracker", "common_prefix", "fixed_prefixes", "shared_prefix", "stable_text"]
