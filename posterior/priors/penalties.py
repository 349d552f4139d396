"""vLLM's ``min_tokens`` and ``repetition_penalty`` as a prior: the request's pi0.

For a step-wise base p, a minimum of m new tokens, end tokens E (EOS and the request's stop token
ids) and a repetition penalty rho > 0, the penalised prior is

    log p_pen(x_t | h) = log_softmax_x( rho_x · log p(x | h) + ban_x ),
    rho_x = rho if x occurs in h (the prompt or the tokens generated so far, as vLLM counts), else 1,
    ban_x = -inf if x in E and fewer than m tokens were generated, else 0,

renormalised over the vocabulary. vLLM multiplies a seen token's negative logit by rho (and divides
a positive one); logits are defined up to a shift, and here the rule is applied to the request
prior's log-probabilities (all <= 0, temperature / top-k / top-p applied), so rho > 1 always lowers a
seen token, and the numbers are not vLLM's. After a row's first end token nothing is changed (its
padding). The model supplies, the samplers own: sampling (``start``/``extend``, ``continue_prefixes``)
and scoring (``token_log_probs``, teacher forcing through the same states) read the same modified
distribution, so SMC weights and the log-probs a server returns are those of p_pen.

Only priors with next-token distributions (``NEXT_TOKEN``) can be wrapped: a sequence-level engine
gives no distribution to modify.
"""

from __future__ import annotations

import math

import torch

from posterior.priors.base import CONTINUE, GRAD, NEXT_TOKEN, PREFIX_CACHE, DecodeState, StepwisePrior


class _PenaltyCache:
    __slots__ = ("base", "seen", "generated", "ended")

    def __init__(self, base: DecodeState, seen: list[list[int]], generated: list[int], ended: list[bool]):
        self.base, self.seen, self.generated, self.ended = base, seen, generated, ended


class PenalizedPrior(StepwisePrior):
    """The penalised prior of the module docstring over a step-wise ``base``.

    Ownership follows the base: ``extend``/``reorder`` consume the state, ``select``/``truncate``/
    ``merge_rows`` leave their inputs intact."""

    def __init__(self, base: StepwisePrior, *, min_tokens: int = 0, repetition_penalty: float = 1.0, end_token_ids=()):
        if not isinstance(base, StepwisePrior) or not base.has(NEXT_TOKEN):
            raise ValueError(f"min_tokens / repetition_penalty need a prior with next-token distributions, got {type(base).__name__}")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {min_tokens!r}")
        if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) or not (
            math.isfinite(repetition_penalty) and repetition_penalty > 0
        ):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty!r}")
        self.base, self.min_tokens, self.repetition_penalty = base, min_tokens, float(repetition_penalty)
        self.end_ids = tuple(dict.fromkeys((*base.eos_token_ids, *end_token_ids)))
        self.temperature, self.top_k, self.top_p = base.temperature, base.top_k, base.top_p

    def __getattr__(self, name):  # tokenizer, model, chat: the base's
        if name.startswith("__") or name in ("base", "min_tokens", "repetition_penalty", "end_ids"):
            raise AttributeError(name)
        return getattr(self.base, name)

    # --- the Prior interface, the base's ---------------------------------------------------------
    vocab_size = property(lambda self: self.base.vocab_size)
    eos_token_ids = property(lambda self: self.base.eos_token_ids)
    max_length = property(lambda self: self.base.max_length)
    device = property(lambda self: self.base.device)

    @property
    def full_support(self) -> bool:
        return False  # end tokens have no mass before min_tokens

    @property
    def capabilities(self) -> frozenset[str]:
        return self.base.capabilities & frozenset({CONTINUE, NEXT_TOKEN, PREFIX_CACHE, GRAD})

    @property
    def reuses_prefix_cache(self) -> bool:
        return PREFIX_CACHE in self.base.capabilities

    def encode_prompts(self, prompts):
        return self.base.encode_prompts(prompts)

    def encode_text(self, text: str) -> list[int]:
        return self.base.encode_text(text)

    def decode(self, token_ids) -> str:
        return self.base.decode(token_ids)

    def vocabulary_key(self):
        return self.base.vocabulary_key()

    def describe(self) -> dict:
        return {**self.base.describe(), "min_tokens": self.min_tokens, "repetition_penalty": self.repetition_penalty}

    def close(self) -> None:  # the base is the caller's
        pass

    # --- decode states -------------------------------------------------------------------------
    def adjust(self, logprobs: torch.Tensor, seen: list[list[int]], generated: list[int], ended: list[bool]) -> torch.Tensor:
        """The base rows' log-probs (B, V) -> the penalised ones (the module docstring)."""
        lp = logprobs.clone()
        rows = [b for b in range(lp.shape[0]) if not ended[b]]
        for b in rows:
            if self.repetition_penalty != 1.0 and seen[b]:
                idx = torch.tensor(sorted(set(seen[b])), device=lp.device)
                lp[b, idx] = lp[b, idx] * self.repetition_penalty
            if generated[b] < self.min_tokens:
                lp[b, list(self.end_ids)] = -math.inf
        if rows:
            sub = lp[rows]
            if bool(torch.isneginf(sub).all(dim=-1).any()):
                raise ValueError(f"min_tokens={self.min_tokens}: a row's prior puts all its mass on end tokens before "
                                 f"{self.min_tokens} tokens")  # fmt: skip
            lp[rows] = torch.log_softmax(sub.double(), dim=-1).to(lp.dtype)
        return lp

    def _state(self, base: DecodeState, seen, generated, ended) -> DecodeState:
        return DecodeState(self.adjust(base.logprobs, seen, generated, ended), base.lengths, _PenaltyCache(base, seen, generated, ended))

    def start(self, prompt_ids, *, copies: int = 1) -> DecodeState:
        base = self.base.start(prompt_ids, copies=copies)
        seen = [list(p) for p in prompt_ids for _ in range(copies)]
        return self._state(base, seen, [0] * len(seen), [False] * len(seen))

    def extend(self, state: DecodeState, tokens: torch.Tensor) -> DecodeState:
        c: _PenaltyCache = state.cache
        ends, toks = set(self.end_ids), tokens.tolist()
        seen = [s if e else s + [t] for s, t, e in zip(c.seen, toks, c.ended)]
        generated = [g + (not e) for g, e in zip(c.generated, c.ended)]
        ended = [e or t in ends for e, t in zip(c.ended, toks)]
        return self._state(self.base.extend(c.base, tokens), seen, generated, ended)

    def _rows(self, c: _PenaltyCache, index: torch.Tensor):
        idx = index.tolist()
        return [list(c.seen[i]) for i in idx], [c.generated[i] for i in idx], [c.ended[i] for i in idx]

    def select(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        return self._state(self.base.select(state.cache.base, index), *self._rows(state.cache, index))

    def reorder(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        return self._state(self.base.reorder(state.cache.base, index), *self._rows(state.cache, index))

    def truncate(self, state, prompt_ids, tokens, keep) -> DecodeState:
        keep = torch.as_tensor(keep, dtype=torch.long).cpu()
        base = self.base.truncate(None if state is None else state.cache.base, prompt_ids, tokens, keep)
        ends = set(self.end_ids)
        seen, generated, ended = [], [], []
        for p, row, k in zip(prompt_ids, tokens.tolist(), keep.tolist()):
            new = row[:k]
            stop = next((i for i, t in enumerate(new) if t in ends), None)
            new = new if stop is None else new[: stop + 1]
            seen.append(list(p) + (new if stop is None else new[:-1]))
            generated.append(len(new))
            ended.append(stop is not None)
        return self._state(base, seen, generated, ended)

    def merge_rows(self, take: torch.Tensor, a: DecodeState, b: DecodeState) -> DecodeState:
        base = self.base.merge_rows(take, a.cache.base, b.cache.base)
        pick = take.tolist()
        seen = [x if t else y for t, x, y in zip(pick, a.cache.seen, b.cache.seen)]
        generated = [x if t else y for t, x, y in zip(pick, a.cache.generated, b.cache.generated)]
        ended = [x if t else y for t, x, y in zip(pick, a.cache.ended, b.cache.ended)]
        return self._state(base, seen, generated, ended)


def penalized_prior(prior, *, min_tokens: int = 0, repetition_penalty: float = 1.0, end_token_ids=()):
    """``prior`` with ``min_tokens`` and ``repetition_penalty`` (the module docstring); the prior
    itself when both are off. ``ValueError`` for a prior without next-token distributions."""
    if min_tokens == 0 and repetition_penalty == 1.0:
        return prior
    return PenalizedPrior(prior, min_tokens=min_tokens, repetition_penalty=repetition_penalty, end_token_ids=end_token_ids)


__all__ = ["PenalizedPrior", "penalized_prior"]
