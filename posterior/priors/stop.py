"""A prior that ends where its text first contains a stop string (OpenAI's ``stop``).

For a base prior p, stop strings S and stop token ids K, the stopped prior is

    p_S(x_t | x_<t) = p(x_t | x_<t)        if text(x_<t) contains no s in S,
                    = 1{x_t = EOS}          otherwise,

and the tokens of K end a sequence as EOS does (they join ``eos_token_ids``). The text of a
sequence is the base's decoded text cut before the first stop string, so the stop text is never
part of it. The model supplies, the samplers own: every sampler, bound and reward sees the stopped
prior through the ordinary interface (``start``/``extend``/``select``, ``continue_prefixes``,
``token_log_probs``), so pi* is the posterior of the stopped prior and no sampler knows about stops.

``stop_string_prior(prior, stop, stop_token_ids)`` picks the class: :class:`StepwiseStopPrior` for
priors with next-token distributions (the mass goes to EOS in the decode state),
:class:`SequenceStopPrior` otherwise (a base continuation is cut after the stop and EOS appended:
the same distribution, since the base draws the tokens up to the stop with the same probabilities).

"text(x_<t) contains s" is checked on the decoded text of the continuation so far (the prompt
excluded). Decoding a prefix gives a prefix of the decoded whole except where a tokenizer rewrites
an unfinished end (a partial multi-byte character, "cleaned-up" spaces): a stop string of ordinary
text is found at the same place in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from posterior.priors.base import (
    CONTINUE,
    GRAD,
    ROW_STREAMS,
    NEXT_TOKEN,
    PREFIX_CACHE,
    DecodeState,
    Extension,
    Prior,
    StepwisePrior,
    budgets_per_row,
)

MAX_STOPS = 4  # OpenAI allows up to 4 stop strings


def check_stops(stop, stop_token_ids, vocab_size: int | None = None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``stop`` (None, a string or a list of up to 4 non-empty strings) and ``stop_token_ids`` (None
    or a list of token ids) as tuples; ``ValueError`` naming the bad value."""
    if stop is None:
        stops: list = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, (list, tuple)):
        stops = list(stop)
    else:
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(stops) > MAX_STOPS:
        raise ValueError(f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    ids = [] if stop_token_ids is None else stop_token_ids
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"stop_token_ids must be a list of token ids, got {type(ids).__name__}")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0 or (vocab_size is not None and i >= vocab_size):
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {i!r}")
    return tuple(dict.fromkeys(stops)), tuple(dict.fromkeys(ids))


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` before its first stop string, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


class _Stops:
    """What both stopped priors share: the stop strings, EOS ids, texts and scoring."""

    def _init_stops(self, base: Prior, stop, stop_token_ids) -> None:
        if not isinstance(base, Prior):
            raise ValueError(f"base must be a posterior prior, got {type(base).__name__}")
        self.stops, extra = check_stops(stop, stop_token_ids, base.vocab_size)
        self.base = base
        self._eos = tuple(base.eos_token_ids) + tuple(i for i in extra if i not in base.eos_token_ids)
        self.temperature, self.top_k, self.top_p = base.temperature, base.top_k, base.top_p

    def __getattr__(self, name):  # tokenizer, model, llm, chat: the base's
        if name.startswith("__") or name in ("base", "stops", "_eos"):
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def max_length(self):
        return self.base.max_length

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def full_support(self) -> bool:
        return False  # after a stop string only EOS has mass

    def encode_prompts(self, prompts):
        return self.base.encode_prompts(prompts)

    def encode_text(self, text: str) -> list[int]:
        return self.base.encode_text(text)

    def decode(self, token_ids) -> str:
        """The base's text cut before the first stop string."""
        return cut_at_stop(self.base.decode(token_ids), self.stops)[0]

    def vocabulary_key(self):
        return self.base.vocabulary_key()

    def describe(self) -> dict:
        return {**self.base.describe(), "stop": list(self.stops), "stop_token_ids": list(self._eos[len(self.base.eos_token_ids):])}

    def close(self) -> None:  # the base is the caller's: it closes it
        pass

    def hit(self, ids: Sequence[int]) -> bool:
        """True when the text of continuation tokens ``ids`` (EOS ids skipped) contains a stop string."""
        if not self.stops:
            return False
        eos = set(self._eos)
        return cut_at_stop(self.base.decode([i for i in ids if i not in eos]), self.stops)[1]

    def stop_position(self, ids: Sequence[int], start: int = 0) -> int | None:
        """The first t >= ``start`` with a stop string in text(ids[:t]) (t <= len(ids)), or None."""
        if not self.stops or not self.hit(ids):
            return None
        for t in range(max(start, 1), len(ids) + 1):
            if self.hit(ids[:t]):
                return t
        return None

    def token_log_probs(self, prompt_ids, tokens, lengths, *, grad: bool = False) -> torch.Tensor:
        """The base's scores with the stop applied: at the first t whose prefix text holds a stop
        string, EOS scores 0 and any other token -inf; positions after it score 0."""
        out = self.base.token_log_probs(prompt_ids, tokens, lengths, grad=grad)  # (P, N, T)
        if not self.stops:
            return out
        P, N, T = tokens.shape
        zero = torch.zeros(P, N, T, dtype=torch.bool)
        banned = torch.zeros(P, N, T, dtype=torch.bool)
        eos0 = self.base.eos_token_ids[0]
        for p in range(P):
            for i in range(N):
                L = int(lengths[p, i])
                row = tokens[p, i, :L].tolist()
                s = self.stop_position(row[: max(L - 1, 0)])  # a stop in text(x_<t), t < L
                if s is None:
                    continue
                zero[p, i, s:] = True
                if row[s] != eos0:
                    banned[p, i, s] = True
        zero, banned = zero.to(out.device), banned.to(out.device)
        out = torch.where(zero, torch.zeros((), dtype=out.dtype, device=out.device), out)
        return torch.where(banned, torch.full((), -float("inf"), dtype=out.dtype, device=out.device), out)


class _StopCache:
    __slots__ = ("base", "generated", "done")

    def __init__(self, base: DecodeState, generated: list[list[int]], done: list[bool]):
        self.base, self.generated, self.done = base, generated, done


class StepwiseStopPrior(_Stops, StepwisePrior):
    """The stopped prior of a step-wise base: its decode state carries each row's continuation
    tokens; a row whose text holds a stop string gets all next-token mass on EOS.

    Ownership follows the base: ``extend``/``reorder`` consume the state, ``select``/``truncate``/
    ``merge_rows`` leave their inputs intact."""

    def __init__(self, base: StepwisePrior, stop=None, stop_token_ids=None):
        self._init_stops(base, stop, stop_token_ids)

    @property
    def capabilities(self) -> frozenset[str]:
        return self.base.capabilities & frozenset({CONTINUE, NEXT_TOKEN, PREFIX_CACHE, GRAD, ROW_STREAMS})

    @property
    def reuses_prefix_cache(self) -> bool:
        return PREFIX_CACHE in self.base.capabilities

    def _state(self, base: DecodeState, generated, done) -> DecodeState:
        lp = base.logprobs
        if any(done):
            rows = torch.tensor(done, device=lp.device)
            forced = torch.full_like(lp, -float("inf"))
            forced[:, self.base.eos_token_ids[0]] = 0.0
            lp = torch.where(rows[:, None], forced, lp)  # (B, V)
        return DecodeState(lp, base.lengths, _StopCache(base, generated, done))

    def start(self, prompt_ids, *, copies: int = 1) -> DecodeState:
        base = self.base.start(prompt_ids, copies=copies)
        B = base.lengths.shape[0]
        return self._state(base, [[] for _ in range(B)], [False] * B)

    def extend(self, state: DecodeState, tokens: torch.Tensor) -> DecodeState:
        c: _StopCache = state.cache
        eos = set(self._eos)
        generated = [g if t in eos else g + [t] for g, t in zip(c.generated, tokens.tolist())]
        done = [d or (t not in eos and self.hit(g)) for d, g, t in zip(c.done, generated, tokens.tolist())]
        return self._state(self.base.extend(c.base, tokens), generated, done)

    def _rows(self, c: _StopCache, index: torch.Tensor):
        idx = index.tolist()
        return [c.generated[i] for i in idx], [c.done[i] for i in idx]

    def select(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        return self._state(self.base.select(state.cache.base, index), *self._rows(state.cache, index))

    def reorder(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        return self._state(self.base.reorder(state.cache.base, index), *self._rows(state.cache, index))

    def truncate(self, state, prompt_ids, tokens, keep) -> DecodeState:
        keep = torch.as_tensor(keep, dtype=torch.long).cpu()
        base = self.base.truncate(None if state is None else state.cache.base, prompt_ids, tokens, keep)
        eos = set(self._eos)
        generated = [[t for t in row[:k] if t not in eos] for row, k in zip(tokens.tolist(), keep.tolist())]
        return self._state(base, generated, [self.hit(g) for g in generated])

    def merge_rows(self, take: torch.Tensor, a: DecodeState, b: DecodeState) -> DecodeState:
        base = self.base.merge_rows(take, a.cache.base, b.cache.base)
        pick = take.tolist()
        generated = [x if t else y for t, x, y in zip(pick, a.cache.generated, b.cache.generated)]
        done = [x if t else y for t, x, y in zip(pick, a.cache.done, b.cache.done)]
        return self._state(base, generated, done)


class SequenceStopPrior(_Stops, Prior):
    """The stopped prior of a sequence-level base (a serving engine): each base continuation is
    cut after the token that completes a stop string and EOS appended (if the budget has room)."""

    def __init__(self, base: Prior, stop=None, stop_token_ids=None):
        self._init_stops(base, stop, stop_token_ids)

    @property
    def capabilities(self) -> frozenset[str]:
        return self.base.capabilities & frozenset({CONTINUE, GRAD, ROW_STREAMS})

    def continue_prefixes(self, prompt_ids, prefixes, max_tokens, *, generator=None) -> Extension:
        B = len(prompt_ids)
        budget = budgets_per_row(max_tokens, B)
        ext = self.base.continue_prefixes(prompt_ids, prefixes, budget, generator=generator)
        eos, eos0 = set(self._eos), self.base.eos_token_ids[0]
        rows, lps = [], []
        for b in range(B):
            L = int(ext.lengths[b])
            new, lp = ext.tokens[b, :L].tolist(), ext.token_log_probs[b, :L].tolist()
            end = next((k for k, t in enumerate(new) if t in eos), None)  # a stop token id ends it too
            if end is not None:
                new, lp = new[: end + 1], lp[: end + 1]
            prefix = list(prefixes[b])
            k = self.stop_position(prefix + new, start=len(prefix))  # x_k is EOS once text(prefix + new[:k]) holds a stop
            if k is not None and k - len(prefix) < len(new):
                k -= len(prefix)
                new, lp = new[:k], lp[:k]
                if k < int(budget[b]):
                    new, lp = new + [eos0], lp + [0.0]
            rows.append(new)
            lps.append(lp)
        K = max(1, max(len(r) for r in rows)) if rows else 0
        tokens = torch.full((B, K), eos0, dtype=torch.long)
        token_lp = torch.zeros(B, K)
        for b, (r, lp) in enumerate(zip(rows, lps)):
            tokens[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            token_lp[b, : len(lp)] = torch.as_tensor(lp)
        return Extension(tokens, torch.tensor([len(r) for r in rows], dtype=torch.long), token_lp)


def stop_string_prior(prior: Prior, stop=None, stop_token_ids=None) -> Prior:
    """``prior`` stopped at ``stop`` strings and ``stop_token_ids`` (the module docstring); the
    prior itself when there are none."""
    stops, ids = check_stops(stop, stop_token_ids, prior.vocab_size)
    if not stops and not ids:
        return prior
    cls = StepwiseStopPrior if prior.has(NEXT_TOKEN) else SequenceStopPrior
    return cls(prior, list(stops), list(ids))


__all__ = ["MAX_STOPS", "SequenceStopPrior", "StepwiseStopPrior", "check_stops", "cut_at_stop", "stop_string_prior"]
