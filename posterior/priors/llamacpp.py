"""``LlamaCppPrior``: a GGUF model run by llama.cpp as a step-wise prior whose particles fork their KV cache.

One ``llama_context`` holds one *unified* KV cache; every decode row (a particle) is one sequence
id in it. A cell of the cache holds one token's keys and values and the set of sequences that
attend to it, so copying a sequence (``llama_memory_seq_cp``) copies metadata, never a tensor:

    start(prompts, copies=N)  each prompt is decoded once (one batch), then copied N-1 times
    extend(state, tokens)     one llama_decode of every row's next token (one batch, B outputs)
    select(state, index)      new sequence ids, each a seq_cp of its source (the input intact)
    reorder(state, index)     resampling in place: a kept row keeps its id, each duplicate is a
                              seq_cp, each dropped row is removed (its id is reused)
    truncate / merge_rows     seq_cp of a prefix range / of rows, plus one decode step (MH moves)

so no prefix an ancestor holds is ever decoded again, and SMC costs what plain sampling costs
(one decode of every running particle per token; bench/bench_llamacpp.py measures it).
log pi0(x_t | x_<t) is ``log_softmax`` of llama.cpp's float32 logits (then temperature, top-k,
top-p as every prior applies them: ``process_logits``).

What is exact, and why (llama.cpp as vendored by llama-cpp-python 0.3.36, CPU backend)
----------------------------------------------------------------------------------------
*Exact* here means bitwise: a row's next-token log-probabilities are the same float32 numbers
whichever other rows share the batch and the cache, so a fork's distribution equals its source's
at every later step when both are fed the same tokens (``tests/test_llamacpp.py`` checks this
over many steps, with unrelated rows decoded alongside and rows dropped between steps). It rests
on three settings, chosen after reading ggml's CPU kernels:

1. **Flash attention on** (``flash_attn=True``). ggml's CPU flash-attention kernel walks the
   cache cells of one query *in cell order* and skips every masked cell without touching it, so a
   row's attention output depends only on the cells it attends and their order. Without flash
   attention, attention is a softmax and a matrix product over *all* cells of the cache view, in
   SIMD lanes fixed by cell index: the masked cells add exact zeros, but which lane a row's own
   cells fall into (and whether they fall in the vectorised part or the scalar tail of expf)
   depends on where the other sequences' cells are, so a fork differs from its source in the
   last bits. Measured (tests' fork check, 40 steps): 2.4e-7 in log-probs on an f32 tiny Llama,
   but 0.62 on the Q4_1 SmolLM2: llama.cpp quantises activations to 8 bits before each product
   with 4-bit weights, and a last-bit difference that flips one rounding grows through 30 layers.
   Freeing cells (point 3) gave 2.4e-4 and 0.60 the same way; this prior gives exactly 0 in both.
2. **Ubatches below 64 tokens** (``n_ubatch=32``). With 64 or more queries in a ubatch, ggml
   switches to a tiled flash-attention kernel that sums each tile of 64 cells in SIMD lanes fixed by
   cell index (layout-dependent by reading the code; a fork check with 70 rows and n_ubatch=128
   still came out bitwise equal, so this is a precaution, not a measured failure). Each
   ``llama_decode`` is split into ubatches of ``n_ubatch`` tokens.
3. **Cells in position order.** The order in which a row's cells are visited is their order in
   the cache. llama.cpp puts a new token in the first free cell after the last one it filled, so
   as long as no cell is freed, every sequence's cells lie in position order and a fork visits its
   shared prefix and then its own tokens exactly as its source does. This prior therefore never
   frees a cell while any of its decode states is alive: the cells of dropped rows are moved to
   one reserved sequence (the "graveyard", never decoded) and the whole cache is cleared when the
   last state is released. That costs no more cells than plain sampling (every step decodes one
   cell per running particle either way). When the cache is full, the graveyard is released and
   the decode retried; from then on new tokens may fill holes below a row's earlier cells, and
   forks agree with their sources to float rounding only (``prior.reclaims`` counts these
   events; pass a larger ``n_ctx`` to keep a run exact).

Also float-exact under these settings: a row decoded in a batch of 1 or of 50, at any batch
position; teacher forcing (``token_log_probs``) against sampling (both run ``extend``); and
``truncate``, which re-decodes one token. With more than one thread, a ubatch of a *single*
token over a cache view of >= 512 cells uses ggml's split-KV kernel, which reduces per-thread
partial sums (layout-dependent): ``n_threads=1`` keeps that case exact too.

Not exact, by design: agreement with :class:`~posterior.priors.hf.HFPrior` over the same weights.
HF dequantises the GGUF file to float32 and runs float32 matmuls; llama.cpp keeps the 4-bit
weights and quantises activations to 8 bits for the matrix products (Q4_1 x Q8_1 dot products),
so log-probs differ by a measured amount (max 0.88 per token on the default model; tests/
test_llamacpp.py states the tolerance). ``weights="f32"`` runs a float32 copy of the file instead
(:func:`f32_copy`, written once into the cache): HF's own numbers, so the difference falls to
1.4e-2 with flash attention (its CPU kernel rounds queries to f16) and 2.7e-5 without (float32
rounding; forks then agree with their sources to float rounding rather than bitwise, point 1).
And the float32 K/V cache (``kv_type="f32"``, the default) is what makes the agreement close;
"f16" halves the cache memory and keeps the fork exactness above, but rounds keys and values to
half precision.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from posterior.priors.cache import cache_dir, sampled_digest
from posterior.priors.base import DecodeState, StepwisePrior, process_logits, validate_sampling
from posterior.validate import check_int

INSTALL = "pip install 'posterior-align[llamacpp]' (or: pip install llama-cpp-python==0.3.36, a source build of a few minutes)"
KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16
WEIGHTS = ("stored", "f32")  # run the file's weights, or a float32 copy (f32_copy)
FA_TILE_Q = 64  # ggml-cpu's GGML_FA_TILE_Q: ubatches of this many queries take the tiled (layout-dependent) kernel
_LOG_ERRORS: list[str] = []  # llama.cpp's last error lines (for our exceptions), via the log callback below
_LOG_CALLBACK = None  # the ctypes callback object must outlive every llama.cpp call
_BACKEND_READY = False


def _llama():
    """The ``llama_cpp`` module (imported on first use: an optional extra)."""
    global _BACKEND_READY, _LOG_CALLBACK
    try:
        import llama_cpp
    except ImportError as e:
        raise ModuleNotFoundError(f"LlamaCppPrior needs the [llamacpp] extra: {INSTALL} ({e})") from None
    if not _BACKEND_READY:
        def log(level, text, user_data):  # keep llama.cpp quiet; remember errors for our messages
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                _LOG_ERRORS.append(text.decode("utf-8", "replace").strip())
                del _LOG_ERRORS[:-8]

        _LOG_CALLBACK = llama_cpp.llama_log_callback(log)
        llama_cpp.llama_log_set(_LOG_CALLBACK, None)
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    return llama_cpp


def _last_errors() -> str:
    return ("; llama.cpp said: " + " | ".join(_LOG_ERRORS[-3:])) if _LOG_ERRORS else ""


class _Lease:
    """Sequence ids that one line of decode states owns (``extend`` passes the lease on; ``reorder``
    moves its ids into a new lease). When the last state holding it is garbage, its ids are queued
    for release; the prior releases them at its next call (never from a finaliser, which may run
    on any thread in the middle of a decode)."""

    __slots__ = ("ids", "__weakref__")

    def __init__(self, ids: list[int], released: list):
        self.ids = ids
        weakref.finalize(self, released.append, ids)


@dataclass
class _Rows:
    """``DecodeState.cache`` of a :class:`LlamaCppPrior`: row b is sequence ``lease.ids[b]``,
    whose cache holds ``pos[b]`` tokens (positions 0..pos[b]-1), the first ``prompt_len[b]`` of
    them its prompt. ``consumed`` is set by ``extend``/``reorder`` (their input must not be used again)."""

    lease: _Lease
    pos: list[int]
    prompt_len: list[int]
    consumed: bool = False

    @property
    def ids(self) -> list[int]:
        return self.lease.ids


class LlamaCppPrior(StepwisePrior):
    """A GGUF model run by llama.cpp (``llama-cpp-python``'s low-level API) as a step-wise prior.

    See the module docstring for how rows share one KV cache and what is exact.

    Parameters
    ----------
    path : str or Path
        A ``.gguf`` file (any quantisation llama.cpp reads; never dequantised here).
    chat : bool
        Wrap each prompt as a user turn with the chat template stored in the GGUF file (rendered
        with jinja2, as transformers renders it).
    temperature, top_k, top_p : optional
        Sampling modifications; the prior then *is* the modified distribution.
    eos_token_ids : optional
        Tokens that end a sequence (default: the vocabulary's EOS id, else its end-of-turn id).
    n_ctx : int
        KV cache cells shared by all rows: prompts + every token decoded while a state is alive
        (e.g. P·prompt + P·N·max_new_tokens for SMC). A full cache is reclaimed (see the module doc).
    n_threads : int, optional
        llama.cpp threads (default: torch's intra-op thread count, which the CLI sets).
    kv_type : "f32" or "f16"
        Precision of the cached keys and values.
    flash_attn : bool
        Flash attention (True: needed for exact forks, module doc).
    n_ubatch : int
        Tokens per llama.cpp micro-batch (< 64 keeps forks exact, module doc).
    n_batch : int
        Tokens per ``llama_decode`` call (longer inputs are split into several calls).
    max_rows : int
        Sequence ids (rows of all live decode states together), at most 255 (llama.cpp allows 256
        sequences; one is the graveyard).
    weights : "stored" or "f32"
        "stored" runs the file's own (e.g. 4-bit) weights. "f32" runs a float32 copy that
        llama.cpp writes once into the cache (:func:`f32_copy`): the numbers HF's dequantisation
        gives, so log-probs agree with :class:`~posterior.priors.hf.HFPrior` to float rounding,
        at 4-6x the memory, and faster on CPUs where llama.cpp has no tiled kernel for the stored
        type (Q4_1 on AVX2: bench/bench_llamacpp.py).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        chat: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_ids: Sequence[int] | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        kv_type: str = "f32",
        flash_attn: bool = True,
        n_ubatch: int = 32,
        n_batch: int = 512,
        max_rows: int = 255,
        weights: str = "stored",
    ):
        temperature, top_k, top_p = validate_sampling(temperature, top_k, top_p)
        path = Path(path)
        check_gguf_file(path)
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        n_ctx = check_int("n_ctx", n_ctx, 16)
        n_batch = check_int("n_batch", n_batch, 1)
        n_ubatch = check_int("n_ubatch", n_ubatch, 1, maximum=n_batch)
        max_rows = check_int("max_rows", max_rows, 1, maximum=255)
        n_threads = check_int("n_threads", torch.get_num_threads() if n_threads is None else n_threads, 1)
        if not isinstance(flash_attn, bool):
            raise ValueError(f"flash_attn must be a bool, got {flash_attn!r}")
        llama = _llama()
        self.path, self.chat = path, bool(chat)
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        self.settings = dict(n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type, flash_attn=flash_attn,
                             n_ubatch=n_ubatch, n_batch=n_batch, max_rows=max_rows, weights=weights)  # fmt: skip
        self.weights_path = path if weights == "stored" else f32_copy(path)  # the file llama.cpp runs
        self._lock = threading.RLock()
        self._model = self._ctx = self._batch = None
        mparams = llama.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = llama.llama_model_load_from_file(str(self.weights_path).encode(), mparams)
        if not model:
            raise ValueError(f"llama.cpp cannot load {str(path)!r}{_last_errors()}")
        self._model = model
        cparams = llama.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_ubatch
        cparams.n_seq_max = max_rows + 1  # + the graveyard
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.kv_unified = True
        cparams.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
        cparams.embeddings = False
        cparams.no_perf = True
        ctx = llama.llama_init_from_model(model, cparams)
        if not ctx:
            raise ValueError(f"llama.cpp cannot create a context for {str(path)!r} with {self.settings}{_last_errors()}")
        self._ctx = ctx
        self._mem = llama.llama_get_memory(ctx)
        self._vocab = llama.llama_model_get_vocab(model)
        self._V = int(llama.llama_vocab_n_tokens(self._vocab))
        self._batch = llama.llama_batch_init(n_batch, 0, 1)
        b = self._batch
        self._b_token = np.ctypeslib.as_array(b.token, shape=(n_batch,))
        self._b_pos = np.ctypeslib.as_array(b.pos, shape=(n_batch,))
        self._b_logits = np.ctypeslib.as_array(b.logits, shape=(n_batch,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(n_batch,))[:] = 1
        self._b_seq = [b.seq_id[i] for i in range(n_batch)]
        self._grave = max_rows  # the sequence id that holds dropped rows' cells (never decoded)
        self._free = list(range(max_rows - 1, -1, -1))  # pop() gives the lowest id
        self._live: set[int] = set()
        self._released: list[list[int]] = []
        self.reclaims = 0  # times a full cache released the graveyard (module doc: exactness)
        self.decoded_tokens = 0  # tokens run through llama_decode (prompts included)
        given = None if eos_token_ids is None else [int(i) for i in eos_token_ids]
        if given is not None and (not given or any(not 0 <= i < self._V for i in given)):
            raise ValueError(f"eos_token_ids must be non-empty ids in [0, {self._V}), got {eos_token_ids!r}")
        eos = given or []
        if given is None:
            # the vocabulary's EOS, as transformers' tokenizer of the same GGUF has it (llama.cpp's
            # guessed end-of-turn id, e.g. SmolLM2's <|endoftext|>, only when there is no EOS)
            for i in (llama.llama_vocab_eos(self._vocab), llama.llama_vocab_eot(self._vocab)):
                if i >= 0 and not eos:
                    eos.append(int(i))
        if not eos:
            raise ValueError(f"{str(path)!r} defines no EOS token; pass eos_token_ids=")
        self._eos = tuple(eos)
        self._template = None
        if self.chat:
            tmpl = llama.llama_model_chat_template(model, None)
            if not tmpl:
                raise ValueError(f"chat=True but {str(path)!r} stores no chat template")
            self._template = tmpl.decode()
        self._vocab_key = None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, **options) -> "LlamaCppPrior":
        """Load any GGUF file; ``options`` are the constructor's keyword arguments (checked there, an
        unknown one is a TypeError naming it)."""
        return cls(path, **options)

    def close(self) -> None:
        """Free the llama.cpp context and model (the prior cannot be used afterwards)."""
        if getattr(self, "_lock", None) is None:
            return
        with self._lock:
            llama = _llama()
            if self._batch is not None:
                llama.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx is not None:
                llama.llama_free(self._ctx)
                self._ctx = None
            if self._model is not None:
                llama.llama_model_free(self._model)
                self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    # --- properties ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._V

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def max_length(self) -> int | None:
        return min(int(_llama().llama_model_n_ctx_train(self._model)), self.settings["n_ctx"])

    @property
    def full_support(self) -> bool:
        return self.top_k is None and self.top_p is None

    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache: n_ctx cells x layers x (K + V) x KV heads x head size x the KV
        type's size (head size n_embd / n_head, the Llama-family layout)."""
        llama = _llama()
        m = self._model
        head = llama.llama_model_n_embd(m) // llama.llama_model_n_head(m)
        per_cell = llama.llama_model_n_layer(m) * 2 * llama.llama_model_n_head_kv(m) * head
        return self.settings["n_ctx"] * per_cell * (4 if self.settings["kv_type"] == "f32" else 2)

    def describe(self) -> dict:
        s = self.settings
        return {**super().describe(), "model": str(self.path), "chat": self.chat, "backend": "llama.cpp",
                "kv_type": s["kv_type"], "flash_attn": s["flash_attn"], "n_ctx": s["n_ctx"], "weights": s["weights"]}  # fmt: skip

    # --- text ----------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        """The vocabulary's stored string of one token (e.g. byte-level BPE: "Ġthe")."""
        return _llama().llama_vocab_get_text(self._vocab, int(token_id)).decode("utf-8", "replace")

    def vocabulary_key(self):
        """sha256 of the sorted (token string, id) pairs: the same key as a transformers tokenizer
        of the same vocabulary gives (``TokenizerText.vocabulary_key``)."""
        if self._vocab_key is None:
            items = sorted((self.token_text(i), i) for i in range(self._V))
            self._vocab_key = hashlib.sha256(repr(items).encode()).hexdigest()
        return self._vocab_key

    def _tokenize(self, text: str, *, add_special: bool) -> list[int]:
        llama = _llama()
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (llama.llama_token * cap)()
            n = llama.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, True)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def _render_chat(self, prompt: str) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"the chat template of {self.path.name} refused the prompt: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        llama = _llama()
        special = {}
        for name, fn in (("bos_token", llama.llama_vocab_bos), ("eos_token", llama.llama_vocab_eos)):
            i = fn(self._vocab)
            special[name] = self.token_text(i) if i >= 0 else ""
        return env.from_string(self._template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, **special
        )

    def encode_prompts(self, prompts):
        if prompts is None:  # unconditional: start from BOS (or EOS)
            bos = _llama().llama_vocab_bos(self._vocab)
            return [[int(bos) if bos >= 0 else self._eos[0]]]
        out = []
        for p in prompts:
            ids = self._tokenize(self._render_chat(p), add_special=False) if self.chat else self._tokenize(p, add_special=True)
            if not ids:
                raise ValueError(f"prompt {p!r} encodes to no tokens")
            out.append(ids)
        return out

    def encode_text(self, text: str) -> list[int]:
        return self._tokenize(text, add_special=False)

    def decode(self, token_ids) -> str:
        """Text of tokens, special (control) tokens left out, as transformers' ``skip_special_tokens``."""
        llama = _llama()
        ids = [int(i) for i in token_ids]
        if not ids:
            return ""
        arr = (llama.llama_token * len(ids))(*ids)
        cap = 8 * len(ids) + 16
        while True:
            buf = ctypes_buffer(cap)
            n = llama.llama_detokenize(self._vocab, arr, len(ids), buf, cap, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n

    # --- sequence ids ----------------------------------------------------------------------------
    def _flush(self) -> None:
        """Release the ids of states that became garbage; clear the cache when no state is alive."""
        llama = _llama()
        while self._released:
            ids = self._released.pop()
            self._retire(ids)
        if not self._live and self.decoded_tokens:
            llama.llama_memory_clear(self._mem, False)  # every cell free: the next token goes in cell 0

    def _retire(self, ids) -> None:
        """Drop sequences: their cells go to the graveyard (kept, so no hole opens; module doc)."""
        llama = _llama()
        for s in ids:
            if s in self._live:
                llama.llama_memory_seq_cp(self._mem, s, self._grave, -1, -1)
                llama.llama_memory_seq_rm(self._mem, s, -1, -1)
                self._live.discard(s)
                self._free.append(s)

    def _alloc(self, k: int) -> list[int]:
        if k > len(self._free):
            raise ValueError(
                f"LlamaCppPrior has {len(self._free)} free sequence ids, {k} are needed: rows of all live decode states "
                f"together are at most max_rows={self.settings['max_rows']} (particles x prompts, x2 while a select copies)"
            )
        ids = [self._free.pop() for _ in range(k)]
        self._live.update(ids)
        return ids

    def _lease(self, ids: list[int]) -> _Lease:
        return _Lease(ids, self._released)

    def _check(self, state: DecodeState) -> _Rows:
        c = state.cache
        if not isinstance(c, _Rows):
            raise TypeError(f"not a LlamaCppPrior decode state (cache is {type(c).__name__})")
        if c.consumed:
            raise ValueError("this decode state was consumed by extend/reorder; use the state that call returned")
        return c

    # --- llama_decode ----------------------------------------------------------------------------
    def _decode(self, tokens, positions, seqs, outputs) -> np.ndarray:
        """Run tokens (n,) at ``positions`` in sequences ``seqs``; logits (sum(outputs), V) float32
        of the tokens where ``outputs`` is true, in order."""
        llama = _llama()
        n_batch = self.settings["n_batch"]
        n = len(tokens)
        parts = []
        for s in range(0, n, n_batch):
            e = min(n, s + n_batch)
            m = e - s
            self._b_token[:m] = tokens[s:e]
            self._b_pos[:m] = positions[s:e]
            outs = np.asarray(outputs[s:e], dtype=np.int8)
            self._b_logits[:m] = outs
            seq_ptrs = self._b_seq
            for i, q in enumerate(seqs[s:e]):
                seq_ptrs[i][0] = q
            self._batch.n_tokens = m
            rc = llama.llama_decode(self._ctx, self._batch)
            if rc == 1 and self._reclaim():
                rc = llama.llama_decode(self._ctx, self._batch)
            if rc == 1:
                raise ValueError(
                    f"the llama.cpp KV cache is full (n_ctx={self.settings['n_ctx']} cells for {len(self._live)} live rows): "
                    f"pass a larger n_ctx to LlamaCppPrior{_last_errors()}"
                )
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}{_last_errors()}")
            self.decoded_tokens += m
            k = int(outs.sum())
            if k:
                ptr = llama.llama_get_logits(self._ctx)
                parts.append(np.ctypeslib.as_array(ptr, shape=(k, self._V)).copy())
        if not parts:
            return np.zeros((0, self._V), dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _reclaim(self) -> bool:
        """Free the graveyard's cells (a full cache); True if there were any."""
        llama = _llama()
        if llama.llama_memory_seq_pos_max(self._mem, self._grave) < 0:
            return False
        llama.llama_memory_seq_rm(self._mem, self._grave, -1, -1)
        self.reclaims += 1
        return True

    def _logprobs(self, logits: np.ndarray) -> torch.Tensor:
        return process_logits(torch.from_numpy(logits), self.temperature, self.top_k, self.top_p)  # (B, V)

    # --- decode states ---------------------------------------------------------------------------
    def start(self, prompt_ids, *, copies: int = 1, hidden: bool = False):
        """Rows for ``copies`` copies of each prompt (prompt-major); each prompt is decoded once."""
        if hidden:
            raise NotImplementedError("LlamaCppPrior does not give hidden states (no HIDDEN_STATES capability)")
        copies = check_int("copies", copies, 1)
        P = len(prompt_ids)
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt #{i} has no tokens (llama.cpp needs at least one, e.g. BOS)")
        with self._lock:
            self._flush()
            ids = self._alloc(P * copies)
            toks, pos, seqs, outs = [], [], [], []
            for i, p in enumerate(prompt_ids):
                L = len(p)
                toks += [int(t) for t in p]
                pos += range(L)
                seqs += [ids[i * copies]] * L
                outs += [False] * (L - 1) + [True]
            logits = self._decode(toks, pos, seqs, outs)  # (P, V)
            llama = _llama()
            for i in range(P):
                for j in range(1, copies):
                    llama.llama_memory_seq_cp(self._mem, ids[i * copies], ids[i * copies + j], -1, -1)
            lens = [len(p) for p in prompt_ids for _ in range(copies)]
            lp = self._logprobs(logits)
            if copies > 1:
                lp = lp.repeat_interleave(copies, 0)
            return DecodeState(lp, torch.zeros(P * copies, dtype=torch.long), _Rows(self._lease(ids), list(lens), list(lens)))

    def extend(self, state, tokens):
        with self._lock:
            c = self._check(state)
            B = len(c.ids)
            tok = torch.as_tensor(tokens).reshape(-1).tolist()
            if len(tok) != B:
                raise ValueError(f"extend needs one token per row ({B}), got {len(tok)}")
            self._flush()
            logits = self._decode(tok, c.pos, c.ids, [True] * B)
            c.consumed = True
            return DecodeState(self._logprobs(logits), state.lengths + 1, _Rows(c.lease, [p + 1 for p in c.pos], c.prompt_len))

    def select(self, state, index):
        with self._lock:
            c = self._check(state)
            idx = torch.as_tensor(index).reshape(-1).cpu()
            self._flush()
            new = self._alloc(idx.numel())
            llama = _llama()
            src = idx.tolist()
            for j, r in enumerate(src):
                llama.llama_memory_seq_cp(self._mem, c.ids[r], new[j], -1, -1)
            return DecodeState(
                state.logprobs.index_select(0, idx), state.lengths.index_select(0, idx),
                _Rows(self._lease(new), [c.pos[r] for r in src], [c.prompt_len[r] for r in src]),
            )  # fmt: skip

    def reorder(self, state, index):
        """Resampling in place (``state`` is consumed): a kept row keeps its sequence id, a
        duplicate is a ``seq_cp`` of it, a dropped row's id is retired first and reused."""
        with self._lock:
            c = self._check(state)
            idx = torch.as_tensor(index).reshape(-1).cpu()
            src = idx.tolist()
            old = list(c.ids)
            used = set(src)
            self._flush()
            self._retire([s for r, s in enumerate(old) if r not in used])
            llama = _llama()
            new, seen = [], set()
            for r in src:
                if r in seen:
                    (s,) = self._alloc(1)
                    llama.llama_memory_seq_cp(self._mem, old[r], s, -1, -1)
                    new.append(s)
                else:
                    seen.add(r)
                    new.append(old[r])
            c.lease.ids.clear()  # the ids now belong to the new lease
            c.consumed = True
            return DecodeState(
                state.logprobs.index_select(0, idx), state.lengths.index_select(0, idx),
                _Rows(self._lease(new), [c.pos[r] for r in src], [c.prompt_len[r] for r in src]),
            )  # fmt: skip

    # --- prefix states (MCMC suffix proposals) ---------------------------------------------------
    def truncate(self, state, prompt_ids, tokens, keep):
        """A state for ``prompt_ids[b] + tokens[b, :keep[b]]`` per row, from ``state``'s cache: a
        ``seq_cp`` of the first ``prompt_len + keep - 1`` positions, then the last kept token (the
        last prompt token when keep is 0) decoded again as one step over all rows. ``state`` intact."""
        if state is None:
            return super().truncate(None, prompt_ids, tokens, keep)
        with self._lock:
            c = self._check(state)
            B = len(c.ids)
            keep = torch.as_tensor(keep, dtype=torch.long).cpu().reshape(-1)
            if keep.shape != (B,) or len(prompt_ids) != B or tokens.shape[0] != B:
                raise ValueError(
                    f"truncate needs one prompt, token row and keep per state row ({B}); got {len(prompt_ids)} prompts, "
                    f"tokens {tuple(tokens.shape)}, keep {tuple(keep.shape)}"
                )
            given = [len(p) for p in prompt_ids]
            if given != c.prompt_len:
                raise ValueError(f"truncate: the state's prompt lengths {c.prompt_len} differ from prompt_ids' {given}")
            consumed = state.lengths.cpu()
            if bool((keep < 0).any()) or bool((keep - 1 > consumed).any()):
                raise ValueError(f"truncate: keep {keep.tolist()} must be in [0, consumed + 1] with consumed {consumed.tolist()}")
            self._flush()
            new = self._alloc(B)
            llama = _llama()
            rows = tokens.cpu().tolist()
            cut, refeed = [], []
            for b in range(B):
                k = int(keep[b])
                n_cells = c.prompt_len[b] + k - 1  # positions [0, n_cells) are reused
                if n_cells > 0:
                    llama.llama_memory_seq_cp(self._mem, c.ids[b], new[b], 0, n_cells)
                cut.append(n_cells)
                refeed.append(int(rows[b][k - 1]) if k > 0 else int(prompt_ids[b][-1]))
            lease = self._lease(new)
            logits = self._decode(refeed, cut, new, [True] * B)
            return DecodeState(self._logprobs(logits), keep.clone(), _Rows(lease, [n + 1 for n in cut], list(c.prompt_len)))

    def merge_rows(self, take, a, b):
        """Row i of ``a`` where ``take[i]``, else of ``b``: new sequence ids copied from either (inputs intact)."""
        with self._lock:
            ca, cb = self._check(a), self._check(b)
            take = torch.as_tensor(take, dtype=torch.bool).cpu().reshape(-1)
            B = take.shape[0]
            if len(ca.ids) != B or len(cb.ids) != B:
                raise ValueError(f"merge_rows: take has {B} rows but the states have {len(ca.ids)} and {len(cb.ids)}")
            self._flush()
            new = self._alloc(B)
            llama = _llama()
            t = take.tolist()
            for i in range(B):
                llama.llama_memory_seq_cp(self._mem, (ca if t[i] else cb).ids[i], new[i], -1, -1)
            return DecodeState(
                torch.where(take[:, None], a.logprobs, b.logprobs), torch.where(take, a.lengths, b.lengths),
                _Rows(self._lease(new), [(ca if t[i] else cb).pos[i] for i in range(B)],
                      [(ca if t[i] else cb).prompt_len[i] for i in range(B)]),
            )  # fmt: skip


ENGINE_OPTIONS = ("eos_token_ids", "n_ctx", "n_threads", "kv_type", "flash_attn", "n_ubatch", "n_batch", "max_rows", "weights")


def check_engine_options(options: dict) -> dict:
    """Engine options for :meth:`LlamaCppPrior.from_gguf` (``load_default_prior(backend="llamacpp",
    **options)``, ``--engine-option``; sampling settings have their own arguments): a ``ValueError``
    naming any other key, before anything loads."""
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise ValueError(f"LlamaCppPrior has no engine option(s) {unknown}; its engine options are {list(ENGINE_OPTIONS)}")
    return options


def check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"LlamaCppPrior needs a .gguf file; {str(path)!r} is not a file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic)")


def f32_copy(path: Path) -> Path:
    """A float32 copy of the GGUF file ``path``, written once by llama.cpp (``llama_model_quantize``
    to ``LLAMA_FTYPE_ALL_F32``: every tensor dequantised with ggml's own routines) into
    ``$POSTERIOR_CACHE/llamacpp/`` (default ``~/.cache/posterior``) under a name that carries the
    source's sampled digest, so another file (or a changed one) never reuses it; written to a
    temporary name and renamed, so a copy that exists is whole. About 1 s for the default model."""
    out = cache_dir() / "llamacpp" / f"{path.stem}-{sampled_digest(path)[:16]}-f32.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    llama = _llama()
    params = llama.llama_model_quantize_default_params()
    params.ftype = llama.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True  # the source is quantised: "requantising" to f32 is dequantising
    params.nthread = torch.get_num_threads()
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        import ctypes

        rc = llama.llama_model_quantize(str(path).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise ValueError(f"llama.cpp could not write a float32 copy of {str(path)!r} (code {rc}){_last_errors()}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def ctypes_buffer(n: int):
    import ctypes

    return ctypes.create_string_buffer(n)


__all__ = ["LlamaCppPrior"]
