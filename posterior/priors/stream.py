"""Continuations that keep running between calls: the ``STREAM`` capability of a prior.

A serving engine decodes many requests at once and can keep one running while its caller reads
what it has drawn so far. Block SMC over such a prior (``posterior.samplers.smc_model.BlockModel``)
submits each particle's continuation once, reads it block by block as the engine produces it, and
cancels it when resampling drops the particle: a surviving particle is never stopped and never
re-fed, only the copies resampling makes of it start new requests. ::

    stream = prior.open_stream()
    h = stream.submit(prompt_ids, prefix, max_tokens, seed=s)  # a handle (int)
    stream.wait({h: k})                      # until h has drawn >= k tokens, or ended
    tokens, log_probs, ended = stream.read(h)  # all drawn so far: possibly more than k
    stream.cancel([h])
    stream.close()                           # cancels whatever still runs

The contract, on which the exactness of SMC rests: the tokens of a handle are a prefix of ONE draw
from pi0(. | prompt_ids + prefix), ending at the first EOS token (kept) or after ``max_tokens``
tokens, with ``log_probs`` their log pi0 (float32). ``ended`` is True once the draw is complete.
How far a handle has run when it is read may depend on timing; the tokens never depend on what is
read, when, or what else runs (given the seed). ``read`` after ``cancel`` is an error.

A prior with the capability returns ``STREAM`` among its ``capabilities`` and implements
``open_stream()``. :class:`DrawAhead` is the reference implementation over ``continue_prefixes``
(each draw made whole at the first ``wait`` that needs it, revealed ``lag`` tokens beyond what was
waited for, as an engine that runs ahead): tests use it to check the samplers' use of the contract
against enumerated posteriors; ``VLLMPrior`` keeps its requests running in the engine.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from posterior.validate import check_int


class Stream(Protocol):
    def submit(self, prompt_ids: Sequence[int], prefix: Sequence[int], max_tokens: int, *, seed: int) -> int: ...

    def wait(self, need: dict[int, int]) -> None: ...

    def read(self, handle: int) -> tuple[list[int], list[float], bool]: ...

    def cancel(self, handles: Sequence[int]) -> None: ...

    def close(self) -> None: ...


class DrawAhead:
    """:class:`Stream` over ``prior.continue_prefixes``: the reference implementation.

    Every ``wait`` draws, in one batched call, the whole continuation of each handle it needs
    that has none yet (seeded by that handle's first seed, so the same submissions give the same
    draws); a handle then shows ``lag`` tokens more than it was last waited for (all of them once
    that covers the draw). ``calls`` counts ``continue_prefixes`` calls, ``submitted`` handles."""

    def __init__(self, prior, lag: int = 0):
        self.prior = prior
        self.lag = check_int("lag", lag, 0)
        self._rows: dict[int, tuple[list[int], list[int], int, int]] = {}  # handle -> prompt, prefix, budget, seed
        self._drawn: dict[int, tuple[list[int], list[float]]] = {}
        self._shown: dict[int, int] = {}
        self.calls = 0
        self.submitted = 0

    def submit(self, prompt_ids, prefix, max_tokens, *, seed):
        h = self.submitted
        self.submitted += 1
        self._rows[h] = (list(prompt_ids), list(prefix), check_int("max_tokens", max_tokens, 1), int(seed))
        self._shown[h] = 0
        return h

    def wait(self, need):
        new = [h for h in need if h not in self._drawn]
        for h in new:
            if h not in self._rows:
                raise KeyError(f"stream handle {h} was cancelled or never submitted")
        if new:
            self.calls += 1
            gen = torch.Generator().manual_seed(self._rows[new[0]][3])
            ext = self.prior.continue_prefixes([self._rows[h][0] for h in new], [self._rows[h][1] for h in new],
                                               [self._rows[h][2] for h in new], generator=gen)  # fmt: skip
            for j, h in enumerate(new):
                L = int(ext.lengths[j])
                self._drawn[h] = (ext.tokens[j, :L].tolist(), ext.token_log_probs[j, :L].float().tolist())
        for h, k in need.items():
            self._shown[h] = max(self._shown[h], min(int(k) + self.lag, len(self._drawn[h][0])))

    def read(self, handle):
        if handle not in self._rows:
            raise KeyError(f"stream handle {handle} was cancelled or never submitted")
        if handle not in self._drawn:
            return [], [], False
        tokens, lps = self._drawn[handle]
        k = self._shown[handle]
        return tokens[:k], lps[:k], k == len(tokens)

    def cancel(self, handles):
        for h in handles:
            self._rows.pop(h, None)
            self._drawn.pop(h, None)
            self._shown.pop(h, None)

    def close(self):
        self.cancel(list(self._rows))

    @property
    def open(self) -> int:
        """Handles submitted and not cancelled."""
        return len(self._rows)


__all__ = ["DrawAhead", "Stream"]
