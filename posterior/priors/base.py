"""The prior pi0: a causal model over token sequences, used by capability.

*Sequence-level* (:class:`Prior`, every prior, a serving engine included): sample continuations
of prompts, continue given token prefixes by up to k tokens (stopping at EOS) with each token's
log-probability, and score given continuations (``token_log_probs`` / ``log_prob``, optionally
keeping gradients for training). No state crosses the interface.

*Step-wise* (:class:`StepwisePrior`: ``HFPrior``, ``CallablePrior``): next-token distributions over
an incrementally extended batch of rows, through explicit decode state:

    state = prior.start(prompt_ids, copies=N)   # (P·N) rows, N copies of each prompt; state.logprobs (B, V)
    state = prior.extend(state, tokens)         # append one token per row (B,); consumes state
    state = prior.select(state, index)          # keep / reorder rows (a new state; the input stays intact)

Samplers ask for the capability they need (SMC's token-level tilted proposal needs step-wise
priors; block SMC, MH, IS, rejection and best-of-n need only sequences) and never touch a model
directly. ``HFPrior`` keeps a KV cache in the state, so ``extend`` costs one decoding step;
``CallablePrior`` keeps the prefix.

The support is what the prior's own generation produces: a continuation ends at the first EOS or
after ``max_new_tokens`` tokens (EOS counted), and

    log pi0(x | prompt) = sum_t log p(x_t | prompt, x_<t).

Sampling modifications (temperature, top-k, top-p) are part of the prior: sampling and scoring both
use the modified distribution, and ``describe()`` says so.
"""

from __future__ import annotations

import abc
import copy
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from posterior import streams
from posterior.streams import Streams
from posterior.validate import check_int
from posterior.validate import check_sampling as validate_sampling  # noqa: F401 (its old name and home)


# --- capabilities ---------------------------------------------------------------------------------
# Samplers and training ask a prior for a capability (``prior.has(NEXT_TOKEN)``), never for a class.
CONTINUE = "continue"  # continue_prefixes / sample / token_log_probs: every prior (sequence level)
NEXT_TOKEN = "next_token"  # start / extend / select / reorder over decode states (StepwisePrior)
GRAD = "grad"  # token_log_probs(..., grad=True) keeps the autograd graph (trainable policies)
HIDDEN_STATES = "hidden_states"  # start(..., hidden=True) fills DecodeState.hidden, and
#   hidden_states(prompt_ids, tokens, lengths, *, grad=False) -> (P, N, T, H): the hidden state
#   after the prompt and x_1:t for t = 0..T-1 (the states that predict x_1..x_T)
PREFIX_CACHE = "prefix_cache"  # truncate reuses a state's cache and merge_rows is implemented
ROW_STREAMS = "row_streams"  # sample / continue_prefixes accept a posterior.streams.Streams as
#   ``generator``: one stream per prompt for sample, one per row for continue_prefixes, and row b's
#   draws come only from its stream (a prompt's sample does not depend on what it is batched with)
STREAM = "stream"  # open_stream() -> a posterior.priors.stream.Stream: continuations that keep
#   running between calls (a serving engine), read as they are drawn and cancelled when not needed


@dataclass(frozen=True)
class DecodeState:
    """Rows being decoded. ``logprobs`` is the next-token distribution of every row."""

    logprobs: torch.Tensor  # (B, V) float32, log-normalised
    lengths: torch.Tensor  # (B,) tokens generated so far
    cache: Any = field(repr=False)  # prior-specific (KV cache, prefixes, ...)
    # (B, H) the last layer's hidden state after each row's last token (the one that gives
    # ``logprobs``), or None. Priors with the HIDDEN_STATES capability fill it when the state was
    # started with ``start(..., hidden=True)`` and keep filling it through extend/select/reorder.
    hidden: torch.Tensor | None = field(default=None, repr=False)


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


@dataclass(frozen=True)
class Extension:
    """Up to K new tokens for each of B rows (:meth:`Prior.continue_prefixes`)."""

    tokens: torch.Tensor  # (B, K) int64, padded with eos_token_ids[0] after each row's length
    lengths: torch.Tensor  # (B,) int64 tokens drawn, the EOS included when one was drawn
    token_log_probs: torch.Tensor  # (B, K) float32 log pi0 of each drawn token, 0 after lengths


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


def request_seeds(generator: torch.Generator | None, count: int) -> list[int]:
    """``count`` per-request seeds drawn from ``generator``, for backends that seed each request
    (vLLM): the same generator state gives the same seeds, hence the same samples. With per-row
    streams (:class:`posterior.streams.Streams`, one per request) request r's seed is drawn from
    stream r."""
    if isinstance(generator, Streams):
        if len(generator) != count:
            raise ValueError(f"{count} requests need {count} streams, got {len(generator)}")
        return generator.seeds()
    return torch.randint(0, 2**62, (count,), generator=generator, device="cpu" if generator is None else generator.device).tolist()


class Prior(abc.ABC):
    """Sequence-level capability, which every prior has: sample continuations of prompts, continue
    given prefixes by up to k tokens, and score given continuations (optionally with gradients).

    No decode state crosses the interface: every call takes token ids and returns tensors the
    caller owns. Backends that keep caches (a serving engine's prefix cache) keep them inside.
    """

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
    def continue_prefixes(
        self,
        prompt_ids: Sequence[Sequence[int]],
        prefixes: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int],
        *,
        generator: torch.Generator | None = None,
    ) -> Extension:
        """Continue row b, ``prompt_ids[b] + prefixes[b]``, by up to ``max_tokens[b]`` (>= 1) tokens
        drawn from the prior, stopping after an EOS token. Rows are independent draws.

        Returns
        -------
        Extension
            tokens (B, K) EOS-padded, lengths (B,), token_log_probs (B, K) (0 after each length).
        """

    @abc.abstractmethod
    def token_log_probs(
        self, prompt_ids: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor, *, grad: bool = False
    ) -> torch.Tensor:
        """log pi0(x_t | prompt, x_<t) of given continuations.

        Parameters
        ----------
        prompt_ids : list of P token-id lists
        tokens : LongTensor (P, N, T)
        lengths : LongTensor (P, N)
        grad : bool
            Keep the autograd graph (training a policy); priors that cannot raise NotImplementedError.

        Returns
        -------
        Tensor (P, N, T) float32, 0 at t >= lengths; on the prior's device when ``grad``, else CPU.
        """

    # --- provided ----------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[str]:
        """What this prior can do (the constants at the top of this module); subclasses extend it."""
        return frozenset({CONTINUE})

    def has(self, capability: str) -> bool:
        """``prior.has(NEXT_TOKEN)``: samplers and training ask for capabilities, never classes."""
        return capability in self.capabilities

    @property
    def full_support(self) -> bool:
        """True when every token has positive probability at every prefix by construction (a
        softmax without top-k / top-p), so a proposal's support needs no check against the prior's."""
        return False

    def log_prob(
        self, prompt_ids: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor, *, grad: bool = False
    ) -> torch.Tensor:
        """log pi0 of given continuations: tokens (P, N, T), lengths (P, N) -> (P, N)."""
        return self.token_log_probs(prompt_ids, tokens, lengths, grad=grad).sum(-1)

    def sample(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_new_tokens: int,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Continuations:
        """Draw ``n`` continuations of each prompt (rows prompt-major). With per-prompt streams
        (``ROW_STREAMS``) prompt p's n rows draw from children of stream p."""
        self.check_lengths(prompt_ids, max_new_tokens)
        rows = [list(p) for p in prompt_ids for _ in range(n)]
        ext = self.continue_prefixes(rows, [[] for _ in rows], max_new_tokens, generator=streams.repeat(generator, n))
        return continuations(self, ext, len(prompt_ids), n)

    def with_sampling(self, *, temperature: float, top_k: int | None, top_p: float | None) -> "Prior":
        """The same model with other sampling modifications (a per-request prior of a server).

        A shallow copy: it shares the model, tokenizer and engine with ``self`` (neither owns
        them more than the other; close only the original). Priors whose modified distribution
        needs more than the attributes (an engine's log-prob mode) override this and refuse.
        """
        temperature, top_k, top_p = validate_sampling(temperature, top_k, top_p)
        new = copy.copy(self)
        new.temperature, new.top_k, new.top_p = temperature, top_k, top_p
        return new

    def close(self) -> None:
        """Release what the prior holds outside this process (engines); a no-op by default."""

    def vocabulary_key(self) -> Any:
        """Something equal for two priors exactly when their token ids mean the same strings."""
        return None

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
        check_int("max_new_tokens", max_new_tokens, 1)
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

    def texts_of(self, tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[str]]:
        """Decode (P, N, T) tokens to texts, dropping the EOS and the padding after it."""
        eos = set(self.eos_token_ids)
        out = []
        for row_t, row_l in zip(tokens.tolist(), lengths.tolist()):
            out.append([self.decode([i for i in seq[:L] if i not in eos]) for seq, L in zip(row_t, row_l)])
        return out


def continuations(prior: Prior, ext: Extension, P: int, n: int) -> Continuations:
    """P·n rows of an Extension (prompt-major) as (P, n, ...) Continuations with texts."""
    tokens = ext.tokens.reshape(P, n, -1).cpu()
    lengths = ext.lengths.reshape(P, n).cpu()
    log_prob = ext.token_log_probs.double().sum(-1).reshape(P, n).float().cpu()
    return Continuations(tokens, lengths, log_prob, prior.texts_of(tokens, lengths))


def budgets_per_row(max_tokens, B: int) -> torch.Tensor:
    """``max_tokens`` (an int or one per row) as B budgets, each >= 1 (errors name the value)."""
    budget = torch.as_tensor(max_tokens, dtype=torch.long).cpu()
    budget = budget.expand(B).clone() if budget.dim() == 0 else budget
    if budget.shape != (B,):
        raise ValueError(f"max_tokens must be an int or one per row ({B}), got shape {tuple(budget.shape)}")
    if B and int(budget.min()) < 1:
        raise ValueError(f"max_tokens must be >= 1 for every row, got {budget.tolist()}")
    return budget


class StepwisePrior(Prior):
    """Step-wise capability (``HFPrior``, ``CallablePrior``): next-token distributions over a batch
    of rows that can be extended and reordered, through explicit decode state:

        state = prior.start(prompt_ids, copies=N)   # (P·N) rows; state.logprobs (B, V)
        state = prior.extend(state, tokens)         # append one token per row (B,); consumes state
        state = prior.select(state, index)          # rows ``index`` as a new state; state intact
        state = prior.reorder(state, index)         # like select, but consumes state (in place)

    Ownership: ``extend`` and ``reorder`` consume their input state (a KV cache may be updated in
    place; do not use the old state again); ``select``, ``truncate`` and ``merge_rows`` leave their
    inputs intact and return new states. The sequence-level methods run on one decode loop,
    :func:`decode_rows`.
    """

    @abc.abstractmethod
    def start(self, prompt_ids: list[list[int]], *, copies: int = 1) -> DecodeState:
        """Rows for ``copies`` copies of each prompt, prompt-major: row p·copies + i."""

    @abc.abstractmethod
    def extend(self, state: DecodeState, tokens: torch.Tensor) -> DecodeState:
        """Append ``tokens`` (B,) to every row (``state`` is consumed)."""

    @abc.abstractmethod
    def select(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        """Rows ``index`` (B',) of ``state``, in that order (duplicates allowed); ``state`` intact."""

    def reorder(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        """Like :meth:`select`, but ``state`` is consumed (as by :meth:`extend`), so a prior with a
        KV cache may gather it layer by layer instead of holding two copies (SMC resampling)."""
        return self.select(state, index)

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
    def capabilities(self) -> frozenset[str]:
        extra = {NEXT_TOKEN, ROW_STREAMS} | ({PREFIX_CACHE} if self.reuses_prefix_cache else set())
        return super().capabilities | extra

    @property
    def reuses_prefix_cache(self) -> bool:
        """True when ``truncate`` reuses a state's cache and ``merge_rows`` is implemented."""
        cls = type(self)
        return cls.truncate is not StepwisePrior.truncate and cls.merge_rows is not StepwisePrior.merge_rows

    # --- the sequence-level capability on top of decode states ----------------------------------
    def continue_prefixes(self, prompt_ids, prefixes, max_tokens, *, generator=None) -> Extension:
        """The prefixes enter as continuation tokens, through ``truncate(None, ...)`` (by default
        ``start`` on prompt + prefix), so a wrapper whose law reads what was generated (a stopped
        prior's stop strings, a penalised prior's token counts) counts them."""
        B = len(prompt_ids)
        if len(prefixes) != B:
            raise ValueError(f"continue_prefixes needs one prefix per prompt row, got {len(prefixes)} for {B}")
        budget = budgets_per_row(max_tokens, B)
        keep = torch.tensor([len(x) for x in prefixes], dtype=torch.long)
        tokens = torch.full((B, max(1, int(keep.max()) if B else 1)), self.eos_token_ids[0], dtype=torch.long)
        for b, x in enumerate(prefixes):
            tokens[b, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        state = self.truncate(None, [list(p) for p in prompt_ids], tokens, keep)
        return decode_rows(self, state, budget, generator=generator).extension

    def sample(self, prompt_ids, n, max_new_tokens, *, generator=None, progress=False) -> Continuations:
        """One batched decode over all P·n rows; the prompt is encoded once and copied."""
        self.check_lengths(prompt_ids, max_new_tokens)
        state = self.start(prompt_ids, copies=n)
        budget = torch.full((len(prompt_ids) * n,), max_new_tokens, dtype=torch.long)
        ext = decode_rows(self, state, budget, generator=streams.repeat(generator, n), progress=progress).extension
        return continuations(self, ext, len(prompt_ids), n)

    def token_log_probs(self, prompt_ids, tokens, lengths, *, grad=False) -> torch.Tensor:
        """Teacher forcing through ``start``/``extend`` (``HFPrior`` uses one forward pass)."""
        P, N, T = tokens.shape
        B = P * N
        state = self.start(prompt_ids, copies=N)
        flat = tokens.reshape(B, T).to(self.device)
        forced = decode_rows(self, state, lengths.reshape(B), forced=flat, generator=None)
        out = torch.zeros(B, T, device=self.device)
        width = forced.extension.token_log_probs.shape[1]
        out[:, :width] = forced.extension.token_log_probs.to(self.device)
        return out.view(P, N, T) if grad else out.view(P, N, T).cpu()


class Decoded(NamedTuple):
    extension: Extension  # new tokens of every row
    state: DecodeState | None  # with ``keep_state``: all B rows, having consumed all but the last new token


def decode_rows(
    prior: StepwisePrior,
    state: DecodeState,
    budget: torch.Tensor,
    *,
    generator: torch.Generator | None,
    forced: torch.Tensor | None = None,
    keep_state: bool = False,
    progress: bool = False,
) -> Decoded:
    """The one decode loop: continue every row of ``state`` by up to ``budget[b]`` tokens, stopping
    after EOS; one batched ``extend`` per token over the rows still running.

    Tokens are drawn from ``state.logprobs`` by :func:`posterior.kernels.tilted_sample` (no
    potential: q = pi0), or read from ``forced`` (B, >= max budget) (teacher forcing: ``budget``
    is then each row's length). Finished rows leave the decode batch (``prior.select``) once at
    most half are running. With ``keep_state`` the parked states are merged back
    (``prior.merge_rows``) into one state of all B rows. ``state`` is consumed.

    Memory grows with the steps actually run, not with the budget: a budget far beyond where
    sequences end allocates nothing up front.

    ``generator`` may be per-row streams (:class:`posterior.streams.Streams`, one per row of
    ``state``): row b's tokens are then drawn from stream b only, whichever rows run beside it.
    """
    from posterior.kernels import tilted_sample

    dev = prior.device
    B = budget.shape[0]
    budget = budget.to(dev)
    eos = torch.tensor(prior.eos_token_ids, device=dev)
    pad = prior.eos_token_ids[0]
    if isinstance(generator, Streams) and len(generator) != B:
        raise ValueError(f"decode_rows over {B} rows needs {B} streams, got {len(generator)}")
    steps = int(budget.max()) if B else 0
    cols_tok: list[torch.Tensor] = []  # per step (B,) token of every output row (pad when done)
    cols_lp: list[torch.Tensor] = []  # per step (B,) its log-probability (0 when done)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)  # output row of each decode row
    alive = budget > 0  # (b,) still drawing
    parked: list[tuple[DecodeState, torch.Tensor]] = []
    bar = tqdm(total=steps, desc="decoding", unit="tok", disable=not progress, leave=False)
    for t in range(steps):
        bar.update(1)
        lp = state.logprobs  # (b, V)
        if forced is None:
            tok = tilted_sample(lp, generator=generator).tokens.to(dev)  # (b,)
        else:
            tok = forced[rows, t].to(dev)
        tok = torch.where(alive, tok, pad)
        step_lp = torch.where(alive, lp.gather(1, tok[:, None]).squeeze(1), 0.0)  # (b,)
        col_t = torch.full((B,), pad, dtype=torch.long, device=dev)
        col_l = torch.zeros(B, dtype=step_lp.dtype, device=dev)
        col_t[rows], col_l[rows] = tok, step_lp
        cols_tok.append(col_t)
        cols_lp.append(col_l)
        lengths[rows[alive]] = t + 1
        alive = alive & ~torch.isin(tok, eos) & (t + 1 < budget[rows])
        if not bool(alive.any()):
            break
        if alive.sum() * 2 <= alive.numel():  # compact: drop finished rows from the batch
            idx = alive.nonzero().squeeze(1)
            if keep_state:
                parked.append((state, idx))
                state = prior.select(state, idx)
            else:
                state = prior.reorder(state, idx)
            rows, tok, alive, generator = rows[idx], tok[idx], alive[idx], streams.take(generator, idx)
        state = prior.extend(state, tok)
    bar.close()
    final = None
    if keep_state:
        for parent, idx in reversed(parked):  # put the continuing rows back among their parents'
            b = parent.lengths.shape[0]
            inv = torch.zeros(b, dtype=torch.long, device=dev)
            inv[idx] = torch.arange(idx.numel(), device=dev)
            take = torch.zeros(b, dtype=torch.bool, device=dev)
            take[idx] = True
            state = prior.merge_rows(take, prior.select(state, inv), parent)
        final = state
    if cols_tok:
        tokens, token_lp = torch.stack(cols_tok, 1), torch.stack(cols_lp, 1).float()  # (B, K)
    else:
        tokens, token_lp = torch.full((B, 0), pad, dtype=torch.long, device=dev), torch.zeros(B, 0, device=dev)
    return Decoded(Extension(tokens, lengths, token_lp), final)
