"""``CallablePrior``: a prior given by a next-token function over a small explicit vocabulary.

Used for exact toy priors (whose posterior can be enumerated) and for users' own models. The last
vocabulary entry is the end-of-sequence token; a sequence's text is the concatenation of its
non-EOS tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from posterior.priors.base import DecodeState, StepwisePrior, process_logits, validate_sampling

NextLogprobs = Callable[[torch.Tensor], torch.Tensor]


class CallablePrior(StepwisePrior):
    """A prior defined by ``next_logprobs(prefix_ids: LongTensor[B, T]) -> Tensor[B, V]``.

    Parameters
    ----------
    vocab : list of str
        One string per token; the LAST entry is the end-of-sequence token.
    next_logprobs : callable
        Log-probabilities of the next token given the prefixes (prompt tokens followed by the
        continuation so far; T may be 0). Rows of one call share their length T.
    temperature, top_k, top_p : optional
        Sampling modifications; the prior then *is* the modified distribution.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        next_logprobs: NextLogprobs,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ):
        vocab = list(vocab)
        if len(vocab) < 2:
            raise ValueError(f"vocab needs at least one token and the EOS token, got {vocab!r}")
        if not all(isinstance(v, str) for v in vocab):
            raise ValueError(f"vocab entries must be str, got {vocab!r}")
        if not callable(next_logprobs):
            raise ValueError(f"next_logprobs must be callable, got {next_logprobs!r}")
        validate_sampling(temperature, top_k, top_p)
        self.vocab = vocab
        self.next_logprobs = next_logprobs
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (len(self.vocab) - 1,)

    def vocabulary_key(self):
        return tuple(self.vocab)

    # --- text ------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Greedy longest-match tokenisation over the non-EOS vocabulary."""
        ids, i = [], 0
        words = sorted(((w, j) for j, w in enumerate(self.vocab[:-1]) if w), key=lambda x: -len(x[0]))
        while i < len(text):
            for w, j in words:
                if text.startswith(w, i):
                    ids.append(j)
                    i += len(w)
                    break
            else:
                raise ValueError(f"text {text!r} cannot be tokenised with vocab {self.vocab[:-1]!r} (stuck at {i})")
        return ids

    def encode_prompts(self, prompts):
        if prompts is None:
            return [[]]
        return [self.encode_text(p) for p in prompts]

    def decode(self, token_ids) -> str:
        return "".join(self.vocab[i] for i in token_ids)

    # --- decode state: the cache is the list of prefixes -----------------------------------------
    def _logprobs(self, prefixes: list[list[int]]) -> torch.Tensor:
        out = torch.empty(len(prefixes), self.vocab_size)
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prefixes):
            by_len.setdefault(len(p), []).append(i)
        for T, rows in by_len.items():
            ids = torch.tensor([prefixes[i] for i in rows], dtype=torch.long).reshape(len(rows), T)
            lp = torch.as_tensor(self.next_logprobs(ids)).float()
            if lp.shape != (len(rows), self.vocab_size):
                raise ValueError(
                    f"next_logprobs returned shape {tuple(lp.shape)} for {len(rows)} prefixes of length {T}; "
                    f"expected ({len(rows)}, {self.vocab_size})"
                )
            bad = torch.isnan(lp) | torch.isposinf(lp)
            norm = torch.logsumexp(lp, dim=-1)
            if bool(bad.any()) or not bool(torch.allclose(norm, torch.zeros_like(norm), atol=1e-4)):
                r = int((bad.any(-1) | ~torch.isclose(norm, torch.zeros_like(norm), atol=1e-4)).nonzero()[0])
                raise ValueError(
                    f"next_logprobs must return normalised log-probabilities; for prefix {ids[r].tolist()} "
                    f"it returned logsumexp {norm[r].item():.6g}"
                )
            out[rows] = lp
        return process_logits(out, self.temperature, self.top_k, self.top_p)

    def start(self, prompt_ids, *, copies=1):
        prefixes = [list(p) for p in prompt_ids for _ in range(copies)]
        return DecodeState(self._logprobs(prefixes), torch.zeros(len(prefixes), dtype=torch.long), prefixes)

    def extend(self, state, tokens):
        prefixes = [p + [int(t)] for p, t in zip(state.cache, tokens.tolist())]
        return DecodeState(self._logprobs(prefixes), state.lengths + 1, prefixes)

    def select(self, state, index):
        idx = index.tolist()
        return DecodeState(state.logprobs[index], state.lengths[index], [state.cache[i] for i in idx])


__all__ = ["CallablePrior"]
