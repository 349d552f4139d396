"""The prior pi0: a causal model over token sequences, used through explicit decode state.

A prior exposes next-token log-probabilities over an incrementally extended batch of rows:

    state = prior.start(prompt_ids, copies=N)   # (P·N) rows, N copies of each prompt; state.logprobs (B, V)
    state = prior.extend(state, tokens)         # append one token per row (B,); new state.logprobs
    state = prior.select(state, index)          # keep / reorder rows (resampling, dropping finished rows)

Samplers never touch a model directly. ``HFPrior`` keeps a KV cache in the state, so ``extend``
costs one decoding step and ``select`` is a gather on the cache; ``CallablePrior`` keeps the prefix.

The support is what the prior's own generation produces: a continuation ends at the first EOS or
after ``max_new_tokens`` tokens (EOS counted), and

    log pi0(x | prompt) = sum_t log p(x_t | prompt, x_<t).

Sampling modifications (temperature, top-k, top-p) are part of the prior: ``next_logprobs`` returns
the modified distribution, so sampling and scoring always agree, and ``describe()`` says so.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class DecodeState:
    """Rows being decoded. ``logprobs`` is the next-token distribution of every row."""

    logprobs: torch.Tensor  # (B, V) float32, log-normalised
    lengths: torch.Tensor  # (B,) tokens generated so far
    cache: Any = field(repr=False)  # prior-specific (KV cache, prefixes, ...)


@dataclass(frozen=True)
class Continuations:
    """Sampled (or given) continuations of P prompts, N each.

    ``tokens`` is padded with the EOS id after each sequence's end; ``lengths`` counts tokens
    including the EOS when there is one; ``log_prob`` is log pi0(x | prompt) under the prior.
    """

    tokens: torch.Tensor  # (P, N, T) int64
    lengths: torch.Tensor  # (P, N) int64
    log_prob: torch.Tensor  # (P, N) float32
    texts: list[list[str]]  # [P][N], EOS excluded


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> tuple[float, int | None, float | None]:
    """Check the sampling modifications (numpy / torch scalars accepted); return them as Python numbers."""
    from posterior.errors import is_int, is_real

    if not (is_real(temperature) and math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if 1.0 / float(temperature) > torch.finfo(torch.float32).max:  # logits / temperature would be inf
        raise ValueError(f"temperature={temperature!r} is too small: 1/temperature overflows float32")
    if top_k is not None and (not is_int(top_k) or int(top_k) < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not (is_real(top_p) and 0 < float(top_p) <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    return float(temperature), None if top_k is None else int(top_k), None if top_p is None else float(top_p)


def process_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits (B, V) -> log-probabilities (B, V) float32 of the (possibly modified) prior."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps at least one).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    return torch.log_softmax(logits, dim=-1)


class Prior(abc.ABC):
    """Base class of priors. Subclasses implement the decode-state methods and text handling."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    # --- what subclasses provide -------------------------------------------------------------
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end a sequence (the first is used as padding)."""

    @property
    def max_length(self) -> int | None:
        """Longest prompt + continuation the model accepts, or None if unbounded."""
        return None

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str] | None) -> list[list[int]]:
        """Token ids of each prompt (None: one unconditional prompt)."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of a continuation's tokens (EOS already removed)."""

    @abc.abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Token ids of a continuation text (no EOS), for scoring given texts."""

    @abc.abstractmethod
    def start(self, prompt_ids: list[list[int]], *, copies: int = 1) -> DecodeState:
        """Rows for ``copies`` copies of each prompt, prompt-major: row p·copies + i."""

    @abc.abstractmethod
    def extend(self, state: DecodeState, tokens: torch.Tensor) -> DecodeState:
        """Append ``tokens`` (B,) to every row."""

    @abc.abstractmethod
    def select(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        """Rows ``index`` (B',) of ``state``, in that order (duplicates allowed)."""

    def reorder(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        """Like :meth:`select`, but ``state`` is consumed (as by :meth:`extend`), so a prior with a
        KV cache may gather it layer by layer instead of holding two copies (SMC resampling)."""
        return self.select(state, index)

    def vocabulary_key(self) -> Any:
        """Something equal for two priors exactly when their token ids mean the same strings."""
        return None

    # --- prefix states (MCMC suffix proposals) -------------------------------------------------
    def truncate(
        self,
        state: DecodeState | None,
        prompt_ids: Sequence[Sequence[int]],
        tokens: torch.Tensor,
        keep: torch.Tensor,
    ) -> DecodeState:
        """A state for ``prompt_ids[b] + tokens[b, :keep[b]]`` in every row b.

        Used to regenerate a suffix from a cut point of an existing sequence. ``state`` (or None)
        holds rows that have already consumed ``prompt_ids[b] + tokens[b, :m_b]`` with
        ``m_b >= keep[b] - 1`` (anything consumed after that is ignored); a prior may reuse its
        cache. The input state is left intact. This default ignores ``state`` and encodes the
        prefixes afresh with ``start``; ``HFPrior`` reuses its KV cache.

        Parameters
        ----------
        state : DecodeState or None
            B rows (see above), or None.
        prompt_ids : list of B token-id lists
            Each row's prompt.
        tokens : LongTensor (B, T)
            Each row's continuation tokens (only the first ``keep[b]`` are read).
        keep : LongTensor (B,)
            Continuation tokens to keep, 0 <= keep[b] <= T.

        Returns
        -------
        DecodeState
            B rows; ``logprobs`` (B, V) is p(. | prompt, tokens[:keep]) and ``lengths`` == keep.
        """
        keep = torch.as_tensor(keep, dtype=torch.long).cpu()
        prefixes = [list(p) + row[:k] for p, row, k in zip(prompt_ids, tokens.tolist(), keep.tolist())]
        fresh = self.start(prefixes, copies=1)
        return DecodeState(fresh.logprobs, keep.to(fresh.lengths.device), fresh.cache)

    def merge_rows(self, take: torch.Tensor, a: DecodeState, b: DecodeState) -> DecodeState:
        """Row i of ``a`` where ``take[i]``, else row i of ``b`` (both B rows; neither is changed).

        Lets an MCMC chain keep its decode state across accept / reject. Priors that reuse caches
        in ``truncate`` implement it; this default raises ``NotImplementedError``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement merge_rows")

    @property
    def reuses_prefix_cache(self) -> bool:
        """True when ``truncate`` reuses a state's cache and ``merge_rows`` is implemented."""
        cls = type(self)
        return cls.truncate is not Prior.truncate and cls.merge_rows is not Prior.merge_rows

    # --- shared behaviour ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def describe(self) -> dict:
        """How the prior is defined (sampling modifications included), for results and logs."""
        return {
            "prior": type(self).__name__,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "modified": self.temperature != 1.0 or self.top_k is not None or self.top_p is not None,
        }

    def check_lengths(self, prompt_ids: list[list[int]], max_new_tokens: int, prompts=None) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        limit = self.max_length
        if limit is None:
            return
        for i, ids in enumerate(prompt_ids):
            if len(ids) + max_new_tokens > limit:
                name = repr(prompts[i][:60]) if prompts else f"#{i}"
                raise ValueError(
                    f"prompt {name} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                    f"exceeds the model's context of {limit} tokens"
                )

    def sample(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_new_tokens: int,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Continuations:
        """Draw ``n`` continuations of each prompt: one batched decode over all P·n rows."""
        return sample_continuations(self, prompt_ids, n, max_new_tokens, generator=generator, progress=progress)

    def log_prob(self, prompt_ids: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """log pi0 of given continuations: tokens (P, N, T), lengths (P, N) -> (P, N).

        The default teacher-forces through ``start``/``extend``; ``HFPrior`` uses one forward pass.
        """
        P, N, T = tokens.shape
        state = self.start(prompt_ids, copies=N)
        flat, flat_len = tokens.reshape(P * N, T).to(self.device), lengths.reshape(P * N).to(self.device)
        total = torch.zeros(P * N, device=self.device)
        steps = int(flat_len.max().item()) if flat_len.numel() else 0
        for t in range(steps):
            tok = flat[:, t]
            total += torch.where(t < flat_len, state.logprobs.gather(1, tok[:, None]).squeeze(1), 0.0)
            if t + 1 < steps:
                state = self.extend(state, tok)
        return total.reshape(P, N).cpu()

    def texts_of(self, tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[str]]:
        """Decode (P, N, T) tokens to texts, dropping the EOS and the padding after it."""
        eos = set(self.eos_token_ids)
        out = []
        for row_t, row_l in zip(tokens.tolist(), lengths.tolist()):
            out.append([self.decode([i for i in seq[:L] if i not in eos]) for seq, L in zip(row_t, row_l)])
        return out


def sample_continuations(
    prior: Prior,
    prompt_ids: list[list[int]],
    n: int,
    max_new_tokens: int,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Continuations:
    """Ancestral sampling from the prior, one batched step per token over all rows.

    Finished rows are dropped from the decode batch (``prior.select``) once at most half the
    rows are still running, so long tails do not pay for finished sequences.
    """
    prior.check_lengths(prompt_ids, max_new_tokens)
    P = len(prompt_ids)
    B = P * n
    device = prior.device
    eos = torch.tensor(prior.eos_token_ids, device=device)
    pad = prior.eos_token_ids[0]
    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    log_prob = torch.zeros(B, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)

    state = prior.start(prompt_ids, copies=n)
    rows = torch.arange(B, device=device)  # which output row each state row is
    alive = torch.ones(B, dtype=torch.bool, device=device)  # (b,) not yet ended
    bar = tqdm(total=max_new_tokens, desc="decoding", unit="tok", disable=not progress, leave=False)
    for t in range(max_new_tokens):
        bar.update(1)
        lp = state.logprobs  # (b, V)
        tok = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(1)  # (b,)
        tok = torch.where(alive, tok, pad)
        live_rows = rows[alive]
        tokens[live_rows, t] = tok[alive]
        log_prob[live_rows] += lp[alive].gather(1, tok[alive, None]).squeeze(1)
        lengths[live_rows] = t + 1
        alive = alive & ~torch.isin(tok, eos)
        if t + 1 == max_new_tokens or not bool(alive.any()):
            break
        if alive.sum() * 2 <= alive.numel():  # compact: drop finished rows from the batch
            keep = alive.nonzero().squeeze(1)
            state, rows, tok, alive = prior.select(state, keep), rows[keep], tok[keep], alive[keep]
        state = prior.extend(state, tok)
    bar.close()
    tokens, lengths, log_prob = tokens.reshape(P, n, -1).cpu(), lengths.reshape(P, n).cpu(), log_prob.reshape(P, n).cpu()
    return Continuations(tokens, lengths, log_prob, prior.texts_of(tokens, lengths))
