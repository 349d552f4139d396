"""``HFPrior``: any transformers causal LM as the prior pi0, decoded with its KV cache.

Prompts are left-padded and run through the model once (P rows); the cache is then expanded to
P·N rows, so the prompt is encoded once however many particles follow it. Each ``extend`` is one
decoding step over all rows; ``select`` gathers cache rows (particle resampling, dropping finished
rows) into a new cache and leaves the old one intact. Position ids are passed explicitly
(cumulative attention mask), so left padding and masked-out positions do not shift positions.

Hidden states (the ``HIDDEN_STATES`` capability, what learned twists read): ``start(...,
hidden=True)`` keeps, in ``DecodeState.hidden`` (B, H), the last layer's hidden state at each row's
last position — the vector the output embedding maps to the next-token logits — from the same
forward pass that gives ``logprobs`` (``output_hidden_states=True``, public transformers API), and
every later state made from it carries it. ``hidden_states`` gives the same vectors for given
continuations in one teacher-forced pass.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from posterior.validate import bidirectional_encoder, check_device, check_hf_model
from posterior.offline import local_model_path, offline
from posterior.priors.base import GRAD, HIDDEN_STATES, DecodeState, StepwisePrior, process_logits, validate_sampling
from posterior.priors.text import TokenizerText, eos_ids


@dataclass(frozen=True)
class _HFCache:
    past: Any  # transformers Cache, B rows
    attention_mask: torch.Tensor  # (B, S) 1 where a cache position is attended
    next_position: torch.Tensor  # (B,) position id of the next token


class HFPrior(TokenizerText, StepwisePrior):
    """A transformers causal language model as the prior.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM (``AutoModelForCausalLM``); put in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
    device, dtype : optional
        Where and in what precision to run the model (default: where it already is).
    chat : bool
        Wrap each prompt as a user turn with the tokenizer's chat template (instruct models).
    eos_token_ids : optional
        Tokens that end a sequence (default: the tokenizer's and generation config's EOS ids).
    temperature, top_k, top_p : optional
        Sampling modifications; the prior then *is* the modified distribution.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        chat: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ):
        temperature, top_k, top_p = validate_sampling(temperature, top_k, top_p)
        check_hf_model(model, tokenizer)
        device = check_device(device)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat = bool(chat)
        if self.chat and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat=True but the tokenizer has no chat template")
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        self._eos = eos_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None), eos_token_ids)
        # A peft model's forward takes **kwargs: read the argument names from the wrapped model.
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(inner.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        # transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` is deprecated)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        gguf_file: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = torch.float32,
        chat: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> "HFPrior":
        """Load a causal LM and its tokenizer from a folder on disk (never from the network).

        ``path`` must be an existing folder (with ``gguf_file``: the folder holding that file); any
        other value, a hub name such as ``"gpt2"`` included, fails at once with a ``ValueError``
        naming it, and the load runs in Hugging Face offline mode (:mod:`posterior.offline`).
        """
        folder = local_model_path(path, what="a causal LM")
        if gguf_file and not (folder / gguf_file).is_file():
            raise ValueError(f"cannot load a causal LM from {path!r} (local files only): no GGUF file {gguf_file!r} in that folder")
        path = os.fspath(path)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"gguf_file": gguf_file} if gguf_file else {}
        with offline():
            if not gguf_file:  # an encoder folder (BERT) loads as a cache-less "LM head": refuse it before the weights
                from transformers import AutoConfig

                try:
                    config = AutoConfig.from_pretrained(path, local_files_only=True)
                except (OSError, ValueError, KeyError) as e:
                    raise ValueError(f"cannot load a causal LM from {path!r} (local files only): {e}") from e
                if not_causal := bidirectional_encoder(config):
                    raise ValueError(f"{path!r} is not a transformers causal LM checkpoint: {not_causal}")
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
                model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, **kw)
            except OSError as e:
                raise ValueError(f"cannot load a causal LM from {path!r} (local files only): {e}") from e
            except (ValueError, KeyError) as e:  # e.g. an encoder or seq2seq config: no causal-LM class for it
                raise ValueError(f"{path!r} is not a transformers causal LM checkpoint: {e}") from e
        return cls(model, tokenizer, device=device, chat=chat, temperature=temperature, top_k=top_k, top_p=top_p)

    # --- properties ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_length(self) -> int | None:
        cfg = self.model.config.get_text_config()
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        return None

    def describe(self) -> dict:
        return {**super().describe(), "model": getattr(self.model.config, "name_or_path", None) or type(self.model).__name__, "chat": self.chat}

    @property
    def capabilities(self) -> frozenset[str]:
        # token_log_probs(..., grad=True) keeps the graph; start(..., hidden=True) keeps hidden states
        return super().capabilities | {GRAD, HIDDEN_STATES}

    @property
    def full_support(self) -> bool:
        return self.top_k is None and self.top_p is None  # a softmax: every token > 0

    # --- model calls -----------------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, past=None, last_only=True, grad=False, hidden=False):
        kw = {"logits_to_keep": 1} if (last_only and self._logits_to_keep) else {}
        if past is not None:
            kw[self._cache_arg] = past
        if hidden:
            kw["output_hidden_states"] = True
        with torch.inference_mode(not grad):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=not grad, **kw)
        return out

    @staticmethod
    def _last_hidden(out) -> torch.Tensor:
        """(B, H) the last layer's hidden state at the last position (the input of the output
        embedding: transformers' ``hidden_states[-1]`` is taken after the final norm)."""
        return out.hidden_states[-1][:, -1]

    @staticmethod
    def _cache_of(out):
        """The KV cache a forward pass returned (``cache`` in newer transformers, else ``past_key_values``)."""
        cache = out.get("cache") if hasattr(out, "get") else None
        return cache if cache is not None else out.past_key_values

    def _left_pad(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        L = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), L), self._eos[0], dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), L), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, L - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def start(self, prompt_ids, *, copies=1, hidden: bool = False):
        """Rows for ``copies`` copies of each prompt (prompt-major). ``hidden=True`` also keeps the
        last hidden state (B, H) in ``state.hidden``, and so does every state made from this one."""
        ids, mask = self._left_pad(prompt_ids)  # (P, L)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(ids, mask, pos, hidden=hidden)
        state = DecodeState(
            self._logprobs(out.logits[:, -1]),
            torch.zeros(len(prompt_ids), dtype=torch.long, device=self.device),
            _HFCache(self._cache_of(out), mask, pos[:, -1] + 1),
            self._last_hidden(out) if hidden else None,
        )
        if copies == 1:
            return state
        return self.select(state, torch.arange(len(prompt_ids), device=self.device).repeat_interleave(copies))

    def extend(self, state, tokens):
        c: _HFCache = state.cache
        B = tokens.shape[0]
        hidden = state.hidden is not None
        mask = torch.cat([c.attention_mask, torch.ones(B, 1, dtype=c.attention_mask.dtype, device=self.device)], dim=1)
        out = self._forward(tokens.view(B, 1).to(self.device), mask, c.next_position.view(B, 1), past=c.past, hidden=hidden)
        return DecodeState(
            self._logprobs(out.logits[:, -1]),
            state.lengths + 1,
            _HFCache(self._cache_of(out), mask, c.next_position + 1),
            self._last_hidden(out) if hidden else None,
        )

    def select(self, state, index):
        c: _HFCache = state.cache
        index = index.to(self.device)
        return DecodeState(
            state.logprobs.index_select(0, index),
            state.lengths.index_select(0, index),
            _HFCache(gather_cache(c.past, index, self.model.config), c.attention_mask.index_select(0, index), c.next_position.index_select(0, index)),
            None if state.hidden is None else state.hidden.index_select(0, index),
        )

    def reorder(self, state, index):
        """:meth:`select` that consumes ``state``: the cache is reordered in place one layer at a time
        (``Cache.reorder_cache``, as beam search does), so peak memory is one layer above the cache."""
        c: _HFCache = state.cache
        if not hasattr(c.past, "reorder_cache"):
            return self.select(state, index)
        index = index.to(self.device)
        c.past.reorder_cache(index)
        return DecodeState(
            state.logprobs.index_select(0, index),
            state.lengths.index_select(0, index),
            _HFCache(c.past, c.attention_mask.index_select(0, index), c.next_position.index_select(0, index)),
            None if state.hidden is None else state.hidden.index_select(0, index),
        )

    # --- prefix states (MCMC suffix proposals) ---------------------------------------------------
    def truncate(self, state, prompt_ids, tokens, keep, *, hidden: bool | None = None):
        """A state for ``prompt_ids[b] + tokens[b, :keep[b]]`` per row, reusing ``state``'s KV cache.

        Attended cache slots hold positions 0, 1, 2, ... in slot order (positions are explicit), so
        the prompt and the first ``keep[b] - 1`` continuation tokens are the first
        ``prompt_len + keep[b] - 1`` attended slots. Those are gathered into a new, compact cache
        (left-padded; masked slots from earlier truncations are dropped, so the cache never grows
        beyond the longest row), and the last kept token (the last prompt token when keep is 0) is
        fed again as one decoding step over all rows to get p(. | prompt, x_<keep) exactly. Cost:
        one cache copy and one decoding step, whatever the prefix lengths. ``state`` is unchanged.
        Caches other than full-attention ``DynamicCache`` layers (e.g. sliding windows) fall back
        to encoding the prefixes afresh. The new state keeps hidden states when ``hidden`` is True,
        or (``hidden=None``) when ``state`` has them.

        Parameters
        ----------
        state : DecodeState or None
            B rows made by ``start``/``extend``/``select``/``truncate``/``merge_rows`` that have
            consumed ``prompt_ids[b] + tokens[b, :m_b]`` with m_b >= keep[b] - 1; None encodes afresh.
        prompt_ids : list of B token-id lists
        tokens : LongTensor (B, T)
        keep : LongTensor (B,)
        """
        if hidden is None:
            hidden = state is not None and state.hidden is not None
        if state is None or not _slot_gatherable(state.cache.past):
            keep = torch.as_tensor(keep, dtype=torch.long).cpu()
            prefixes = [list(p) + row[:k] for p, row, k in zip(prompt_ids, tokens.tolist(), keep.tolist())]
            fresh = self.start(prefixes, copies=1, hidden=hidden)
            return DecodeState(fresh.logprobs, keep.to(fresh.lengths.device), fresh.cache, fresh.hidden)
        c: _HFCache = state.cache
        dev = self.device
        B = state.lengths.shape[0]
        keep = torch.as_tensor(keep, dtype=torch.long, device=dev)
        if keep.shape != (B,) or len(prompt_ids) != B or tokens.shape[0] != B:
            raise ValueError(
                f"truncate needs one prompt, token row and keep per state row ({B}); got {len(prompt_ids)} prompts, "
                f"tokens {tuple(tokens.shape)}, keep {tuple(keep.shape)}"
            )
        prompt_len = c.next_position - state.lengths  # (B,)
        given = torch.tensor([len(p) for p in prompt_ids], device=dev)
        if not bool((prompt_len == given).all()):
            raise ValueError(f"truncate: the state's prompt lengths {prompt_len.tolist()} differ from prompt_ids' {given.tolist()}")
        if bool((keep < 0).any()) or bool((keep - 1 > state.lengths).any()):
            raise ValueError(
                f"truncate: keep {keep.tolist()} must be in [0, consumed + 1] with consumed {state.lengths.tolist()}"
            )
        n_slots = prompt_len + keep - 1  # (B,) attended slots to retain; >= 0 (prompts are non-empty)
        attended = c.attention_mask.bool()  # (B, S)
        retain = attended & (c.attention_mask.cumsum(-1) <= n_slots[:, None])  # (B, S)
        width = int(n_slots.max().item())
        past, mask = _gather_slots(c.past, retain, width, self.model.config)
        tok = tokens.to(dev)
        last_prompt = torch.tensor([p[-1] for p in prompt_ids], dtype=torch.long, device=dev)  # (B,)
        refeed = torch.where(keep > 0, tok.gather(1, (keep - 1).clamp(min=0)[:, None]).squeeze(1), last_prompt)  # (B,)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)  # (B, width + 1)
        out = self._forward(refeed.view(B, 1), mask, n_slots.view(B, 1), past=past, hidden=hidden)
        return DecodeState(
            self._logprobs(out.logits[:, -1]), keep, _HFCache(self._cache_of(out), mask, n_slots + 1),
            self._last_hidden(out) if hidden else None,
        )  # fmt: skip

    def merge_rows(self, take, a, b):
        """Row i of ``a`` where ``take[i]`` else of ``b``, as one new compact cache (inputs unchanged).

        The two caches may differ in width; each row's attended slots are gathered, in order, into
        a left-padded cache as wide as the longest merged row.
        """
        ca, cb = a.cache, b.cache
        take = torch.as_tensor(take, dtype=torch.bool, device=self.device)
        B = take.shape[0]
        if a.lengths.shape[0] != B or b.lengths.shape[0] != B:
            raise ValueError(f"merge_rows: take has {B} rows but the states have {a.lengths.shape[0]} and {b.lengths.shape[0]}")
        if (a.hidden is None) != (b.hidden is None):
            raise ValueError("merge_rows: one state keeps hidden states and the other does not (start both with the same hidden=)")
        keep_a = ca.attention_mask.bool() & take[:, None]  # (B, Sa)
        keep_b = cb.attention_mask.bool() & ~take[:, None]  # (B, Sb)
        width = int(torch.maximum(keep_a.sum(-1), keep_b.sum(-1)).max().item())
        pa, ma = _gather_slots(ca.past, keep_a, width, self.model.config)
        pb, mb = _gather_slots(cb.past, keep_b, width, self.model.config)
        sel = take[:, None, None, None]
        data = [
            (torch.where(sel, la.keys, lb.keys), torch.where(sel, la.values, lb.values))
            for la, lb in zip(pa.layers, pb.layers)
        ]
        t1 = take[:, None]
        return DecodeState(
            torch.where(t1, a.logprobs, b.logprobs),
            torch.where(take, a.lengths, b.lengths),
            _HFCache(
                cache_from_tensors(data, self.model.config),
                ma + mb,
                torch.where(take, ca.next_position, cb.next_position),
            ),
            None if a.hidden is None else torch.where(t1, a.hidden, b.hidden),
        )

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return process_logits(logits[:, : self.vocab_size], self.temperature, self.top_k, self.top_p)

    # --- scoring ---------------------------------------------------------------------------------
    def _teacher_forced(self, prompt_ids, tokens, lengths, *, grad: bool, chunk: int, hidden: bool = False):
        """The one teacher-forced pass: prompts left-padded, continuations right-masked, ``chunk``
        rows per forward call.

        Yields ``(rows, out, L, flat, cont_mask)`` per chunk: ``out`` the model's output on
        ``prompt + x_1:T``, so position ``L - 1 + t`` (t = 0..T-1) is the state after the prompt
        and x_1:t; ``flat`` (B, T) and ``cont_mask`` (B, T) are all rows' tokens and validity.
        With ``hidden`` the logits of the last position only are computed.
        """
        P, N, T = tokens.shape
        ids, mask = self._left_pad(prompt_ids)  # (P, L)
        L = ids.shape[1]
        flat = tokens.reshape(P * N, T).to(self.device)
        flat_len = lengths.reshape(P * N).to(self.device)
        prompt_row = torch.arange(P, device=self.device).repeat_interleave(N)
        cont_mask = (torch.arange(T, device=self.device) < flat_len[:, None]).long()  # (B, T)
        for s in range(0, P * N, chunk):
            rows = slice(s, s + chunk)
            x = torch.cat([ids[prompt_row[rows]], flat[rows]], dim=1)  # (b, L+T)
            m = torch.cat([mask[prompt_row[rows]], cont_mask[rows]], dim=1)
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            yield rows, self._forward(x, m, pos, last_only=hidden, grad=grad, hidden=hidden), L, flat, cont_mask

    def token_log_probs(self, prompt_ids, tokens, lengths, *, grad: bool = False, max_chunk_elements: int = 1 << 27):
        """Per-token log pi0 of given continuations in one teacher-forced forward pass per chunk.

        tokens (P, N, T), lengths (P, N) -> (P, N, T), 0 at t >= length. Rows are chunked so that
        the (rows, T, V) logits stay under ``max_chunk_elements`` floats. ``grad=True`` runs the
        model with autograd (no KV cache; a policy being trained) and returns a tensor on the
        model's device that carries the graph.
        """
        P, N, T = tokens.shape
        parts = []
        for rows, out, L, flat, cont_mask in self._teacher_forced(
            prompt_ids, tokens, lengths, grad=grad, chunk=max(1, max_chunk_elements // max(1, T * self.vocab_size))
        ):
            logits = out.logits[:, L - 1 : L + T - 1]  # (b, T, V)
            lp = self._logprobs(logits.reshape(-1, logits.shape[-1])).view(logits.shape[0], T, -1)
            tok_lp = lp.gather(-1, flat[rows, :, None]).squeeze(-1)  # (b, T)
            parts.append(torch.where(cont_mask[rows].bool(), tok_lp, 0.0))
        out = torch.cat(parts).view(P, N, T) if parts else torch.zeros(P, N, T, device=self.device)
        return out if grad else out.cpu()

    def hidden_states(self, prompt_ids, tokens, lengths, *, grad: bool = False, max_chunk_elements: int = 1 << 27):
        """The last layer's hidden states along given continuations, in one teacher-forced pass.

        Parameters
        ----------
        prompt_ids : list of P token-id lists
        tokens : LongTensor (P, N, T)
        lengths : LongTensor (P, N)
        grad : bool
            Keep the autograd graph through the model.

        Returns
        -------
        Tensor (P, N, T, H) float
            Index t is the state after the prompt and x_1:t (t = 0..T-1), the one whose logits
            give p(x_t+1 | prompt, x_1:t) — what ``start(..., hidden=True)`` / ``extend`` keep in
            ``DecodeState.hidden``; 0 at t >= length. On the model's device when ``grad``, else
            on the CPU (an ordinary tensor, usable in autograd).
        """
        P, N, T = tokens.shape
        H = self.model.config.get_text_config().hidden_size
        layers = self.model.config.get_text_config().num_hidden_layers
        L = max(len(p) for p in prompt_ids)
        chunk = max(1, max_chunk_elements // max(1, (L + T) * H * (layers + 1)))  # every layer's states are returned
        parts = []
        for rows, out, L, _, cont_mask in self._teacher_forced(prompt_ids, tokens, lengths, grad=grad, chunk=chunk, hidden=True):
            h = out.hidden_states[-1][:, L - 1 : L + T - 1]  # (b, T, H)
            parts.append(h * cont_mask[rows, :, None].to(h.dtype))
        out = torch.cat(parts).view(P, N, T, -1) if parts else torch.zeros(P, N, T, H, device=self.device)
        # Outside inference mode a copy is an ordinary tensor (inference tensors cannot be saved
        # for backward, which a trainable head on top of them needs).
        return out if grad else out.cpu().clone()


def cache_from_tensors(data, config=None):
    """A ``DynamicCache`` holding the given (keys, values) per layer, built through the public
    ``Cache.update`` (no private constructors)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(data):
        cache.update(k, v, i)
    return cache


def gather_cache(past, index: torch.Tensor, config=None):
    """A new cache holding rows ``index`` of ``past`` (which is left untouched)."""
    if _slot_gatherable(past):
        data = [(layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in past.layers]
        return cache_from_tensors(data, config)
    if hasattr(past, "reorder_cache"):  # other caches (sliding windows, ...): copy, then the public reorder
        import copy

        past = copy.deepcopy(past)
        past.reorder_cache(index)
        return past
    raise TypeError(f"cannot gather rows of a {type(past).__name__} cache")


def _slot_gatherable(past) -> bool:
    """Whether this cache's slots can be moved freely: a ``DynamicCache`` of full-attention layers
    (no sliding windows), read through its public ``layers[i].keys`` / ``.values``."""
    from transformers import DynamicCache

    if not isinstance(past, DynamicCache) or not hasattr(past, "layers"):
        return False
    sliding = getattr(past, "is_sliding", [False])
    return not any(sliding) and all(hasattr(layer, "keys") and layer.keys is not None for layer in past.layers)


def _gather_slots(past, retain: torch.Tensor, width: int, config=None):
    """A new cache of ``width`` slots holding, per row, the slots where ``retain`` (B, S) is true,
    in order and right-aligned (left padding), with its attention mask (B, width).

    Exact for caches whose slots carry explicit positions (keys are stored after the position
    embedding / rotary step), which is how ``HFPrior`` calls the model; ``past`` is left untouched.
    """
    B = retain.shape[0]
    count = retain.sum(-1)  # (B,)
    if bool((count > width).any()):
        raise ValueError(f"cannot fit {int(count.max())} slots into a cache of width {width}")
    rows, slots = retain.nonzero(as_tuple=True)
    dest = (width - count)[rows] + retain.long().cumsum(-1)[rows, slots] - 1  # destination slot of each kept slot
    index = torch.zeros(B, width, dtype=torch.long, device=retain.device)  # (B, W) source slot (0 where padding)
    index[rows, dest] = slots
    mask = torch.zeros(B, width, dtype=torch.long, device=retain.device)  # (B, W)
    mask[rows, dest] = 1

    def pick(t):  # (B, H, S, D) -> (B, H, W, D)
        return t.gather(2, index[:, None, :, None].expand(B, t.shape[1], width, t.shape[-1]))

    data = [(pick(layer.keys), pick(layer.values)) for layer in past.layers]
    return cache_from_tensors(data, config), mask
