"""Rows of a table over (prompt, prefix) for a small vocabulary: what tabular objects index by.

A prior's continuations of at most T = ``max_new_tokens`` tokens (EOS counted) pass through the
prefixes x_1:t, t = 0..T-1, that contain no EOS. With K prompts, V tokens (EOS included) and
W = V - |EOS| word tokens there are S = sum_{t<T} W^t such prefixes per prompt; a table with
one (K, S, V) entry per (prompt, prefix, next token) then holds

* a tabular policy's logits q(v | prompt, x_1:t) (:class:`posterior.train.TabularPolicy`), or
* a tabular twist's values psi(x_1:t · v) of every prefix of length 1..T
  (:class:`posterior.twists.TabularTwist`).

Both index it through :class:`PrefixIndex`, so the enumeration order is written once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from posterior.priors.base import Prior

MAX_TABLE_ENTRIES = 50_000_000  # entries of a (K, S, V) table


def table_size(prior: Prior, max_new_tokens: int, num_prompts: int = 1) -> int:
    """K · S · V entries of the (K, S, V) table (see the module docstring), without building it."""
    V = prior.vocab_size
    W = V - len(set(prior.eos_token_ids))
    return num_prompts * sum(W**t for t in range(max_new_tokens)) * V


class PrefixIndex:
    """Rows (k, s) of a (K, S, V) table: k a prompt, s a prefix of length < ``max_new_tokens``.

    Parameters
    ----------
    prior : Prior
        Its ``encode_prompts``, ``vocab_size`` and ``eos_token_ids`` define the rows.
    max_new_tokens : int
        T: prefixes of length 0..T-1 get rows.
    prompts : list of str or None
        The prompts the table covers (None: one unconditional prompt). Others raise.
    what : str
        The table's owner in error messages, e.g. "tabular policy".
    hint : str
        How to build the owner for other prompts, appended to the unknown-prompt error.
    """

    def __init__(self, prior: Prior, max_new_tokens: int, prompts: Sequence[str] | None, *, what: str, hint: str = ""):
        self.prior = prior
        self.max_new_tokens = max_new_tokens
        self.prompts = None if prompts is None else list(prompts)
        self.what, self.hint = what, hint
        self.prompt_index: dict[tuple[int, ...], int] = {}
        for p in prior.encode_prompts(self.prompts):
            self.prompt_index.setdefault(tuple(p), len(self.prompt_index))
        eos = set(prior.eos_token_ids)
        words = [v for v in range(prior.vocab_size) if v not in eos]
        K, V = len(self.prompt_index), prior.vocab_size
        size = table_size(prior, max_new_tokens, K)
        if size > MAX_TABLE_ENTRIES:
            W = len(words)
            raise ValueError(
                f"a {what} over {K} prompt(s), {sum(W**t for t in range(max_new_tokens))} prefixes and {V} tokens "
                f"needs {size} entries (> {MAX_TABLE_ENTRIES}); use a smaller vocabulary or max_new_tokens"
            )
        prefixes: list[tuple[int, ...]] = [()]
        for t in range(1, max_new_tokens):
            prefixes += list(itertools.product(words, repeat=t))
        self.prefixes = prefixes
        self.prefix_index = {p: s for s, p in enumerate(prefixes)}
        self.shape = (K, len(prefixes), V)

    def prompt_key(self, ids: Sequence[int]) -> int:
        """k of a prompt's token ids; a prompt the table does not cover raises."""
        k = self.prompt_index.get(tuple(ids))
        if k is None:
            text = self.prior.decode(list(ids))
            raise ValueError(f"prompt {text!r} (ids {list(ids)}) is not one of the {self.what}'s prompts {self.prompts!r}{self.hint}")
        return k

    def contexts(self) -> list[list[int]]:
        """prompt + prefix token ids of every row, row-major (k, s)."""
        return [list(k) + list(p) for k in self.prompt_index for p in self.prefixes]

    def positions(self, prompt_ids: Sequence[Sequence[int]], tokens: torch.Tensor, lengths: torch.Tensor):
        """Rows of every position of continuations: (k, s(x_1:t-1)) for position t-1 (the row whose
        entry ``[..., x_t]`` is about x_1:t).

        Parameters
        ----------
        prompt_ids : list of P token-id lists
        tokens : LongTensor (P, N, T)
        lengths : LongTensor (P, N), at most ``max_new_tokens``

        Returns
        -------
        k_idx, s_idx : LongTensor (P, N, T), 0 past each length
        valid : BoolTensor (P, N, T), position < length
        """
        P, N, T = tokens.shape
        if T and int(lengths.max()) > self.max_new_tokens:
            raise ValueError(f"a continuation of {int(lengths.max())} tokens exceeds max_new_tokens={self.max_new_tokens}")
        keys = [self.prompt_key(p) for p in prompt_ids]
        tok, lens = tokens.tolist(), lengths.tolist()
        k_idx = torch.zeros(P, N, T, dtype=torch.long)
        s_idx = torch.zeros(P, N, T, dtype=torch.long)
        for p in range(P):
            for n in range(N):
                seq = tok[p][n]
                for t in range(lens[p][n]):
                    s = self.prefix_index.get(tuple(seq[:t]))
                    if s is None:
                        raise ValueError(f"prefix {seq[:t]} of continuation {seq[:lens[p][n]]} is not in the table (EOS inside?)")
                    k_idx[p, n, t], s_idx[p, n, t] = keys[p], s
        valid = torch.arange(T) < lengths[..., None]  # (P, N, T)
        return k_idx, s_idx, valid


__all__ = ["MAX_TABLE_ENTRIES", "PrefixIndex", "table_size"]
