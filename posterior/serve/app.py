"""The FastAPI application: OpenAI-compatible endpoints that sample pi*(x) ∝ pi0(x)·exp(r(x)/beta).

    app = create_app(prior, config=ServeConfig(model_name="smollm2", api_key="..."))

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (OpenAI shapes, plus the
``posterior`` request object and response fields of :mod:`posterior.serve.protocol`; ``logprobs``,
``echo`` and token-id prompts as :mod:`posterior.serve.logprobs` says), ``GET /v1/models`` and
``/v1/models/{id}`` (OpenAI's shapes; an unknown id is OpenAI's 404), vLLM's ``POST /tokenize``,
``POST /detokenize`` and ``GET /tokenizer_info`` (lm-eval's remote tokenizer reads them),
``GET /health`` (never needs the key). One worker thread owns the prior and runs
the sampler calls (:mod:`posterior.serve.batcher`); request coroutines wait on per-request event
queues, so the event loop never runs a model.

Without a ``posterior`` object a request gets plain prior samples: method "is" with the zero
reward and beta 1, so every weight is equal, log Z = 0 and KL = 0 (``"prior_only": true``).

Streaming (``stream: true``). With method "smc" the text every surviving particle shares is sent as
soon as it is fixed (:mod:`posterior.serve.streaming` says why it can never change), then each
choice's rest with its weight; the first chunk says ``"stream": "prefix"``. Other methods cannot
know any text before they end: their first chunk says ``"stream": "final"`` and the text follows
when the run is done. In both, the deltas of a choice concatenate to its final text. With
``logprobs`` or ``echo`` the tokens are scored when the run ends: the stream is "final", then each
choice comes token by token with its log-probs (:func:`~posterior.serve.logprobs.stream_pieces`),
the pieces concatenating to the non-streamed text and logprobs object.

With ``echo``, a ``posterior`` object and ``posterior.context_tokens`` (the prompt's first tokens
are the context, the rest the continuation), the top-level ``posterior`` also has ``log_prob``, an
estimate of log pi*(continuation + EOS | context) = log pi0 + r/beta - log Z(context), and
``log_prob_bracket`` from :func:`posterior.bounds` (Z over continuations of at most
max(max_tokens, continuation + 1) tokens).

With ``posterior.token_logprobs: "posterior"`` (or ``--token-logprobs posterior``) the
``logprobs`` / ``echo`` values are estimates of log pi* whose sum over any span estimates log
pi*(span | text before it) (:mod:`posterior.serve.logprobs`); ``--default-posterior`` gives
requests without a ``posterior`` object one (lm-eval's loglikelihood sends none).

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 404 an unknown model
(``code: "model_not_found"``), 400 names the field
(bad JSON, nesting deeper than :data:`~posterior.serve.protocol.MAX_JSON_DEPTH`, a lone surrogate, a
number no float holds included), 401 a missing or wrong key, 413 a body above ``max_body_bytes``
(refused before it is parsed), 429 a full queue, 422 a run whose particles all got weight 0, 501 a
reward whose optional package this server lacks (naming it), 500 a failure of the server's own code
(the server carries on): never for a client's mistake.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import logging
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from posterior.serve.batcher import Batcher, Job, QueueFull, abort_when_all_cancelled
from posterior.serve.protocol import (
    MAX_JSON_DEPTH,
    BadRequest,
    Parsed,
    Prompt,
    ServeConfig,
    Served,
    Settings,
    check_json,
    choice_stats,
    choice_seeds,
    choose,
    completion_tokens,
    new_id,
    now,
    parse_request,
    summary,
)
from posterior.serve.logprobs import (
    PrefixValues,
    Scored,
    chat_logprobs,
    completion_logprobs,
    echo_scores,
    forced,
    join,
    stream_pieces,
    tilted,
    visible,
)
from posterior.serve.streaming import PrefixTracker

log = logging.getLogger("posterior.serve")


def _scores_tokens(settings: Settings) -> bool:
    """True when a request's tokens are scored after the run (logprobs or echo): its stream sends
    the text with their log-probs when the run ends, never a text prefix before."""
    return settings.logprobs is not None or settings.echo


def _zero_reward():
    from posterior.rewards.base import Callable

    return Callable(lambda texts: [0.0] * len(texts), name="zero (prior samples)")


class _Rewards:
    """Reward objects by spec, built once (a small LRU: ``contains:WORD`` specs are unbounded)."""

    def __init__(self, prior, size: int = 64):
        self.prior, self.size = prior, size
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: str | None):
        from posterior.rewards.registry import from_spec

        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        reward = _zero_reward() if spec is None else from_spec(spec, prior=self.prior)
        with self._lock:
            self._cache[spec] = reward
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return reward


def error_status(e: BaseException) -> tuple[int, str]:
    """HTTP status and message of a failed sampler call."""
    from posterior.errors import DegenerateWeightsError
    from posterior.rewards.base import RewardError

    if isinstance(e, DegenerateWeightsError):
        return 422, f"every sample has weight 0: {e}"
    if _missing_package(e) is not None:  # an optional package the reward (or method) needs is not installed here
        return 501, f"this server lacks an optional package: {e}"
    if isinstance(e, RewardError):  # the reward is the server's code: its failure is not the request's
        return 500, f"the reward failed: {e}"
    if isinstance(e, (ValueError, TypeError)):  # option values the sampler refused (names them)
        return 400, f"posterior.options: {e}"
    return 500, f"internal error: {type(e).__name__}: {e}"


def _missing_package(e: BaseException) -> ImportError | None:
    """The ImportError of another package that ``e`` is or was raised from (a reward wraps what its
    ``score`` raised in a RewardError), else None. An ImportError inside posterior itself is a bug of
    ours, a 500, never "an optional package is missing"."""
    for _ in range(8):
        if e is None or isinstance(e, ImportError):
            ours = e is not None and (e.name or "").split(".")[0] == "posterior"
            return None if ours else e
        e = e.__cause__
    return None


def _error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
            422: "invalid_request_error", 429: "rate_limit_error", 501: "not_implemented_error"}.get(status, "server_error")  # fmt: skip
    return {"error": {"message": message, "type": kind, "param": param, "code": status if code is None else code}}


class _Priors:
    """The per-request prior of each (temperature, top_k, top_p, stop, stop_token_ids, min_tokens,
    repetition_penalty; :mod:`posterior.priors.penalties` for the last two): the served
    prior with those sampling parameters (``Prior.with_sampling``, sharing the model) and stopped
    at the stop strings (:func:`posterior.priors.stop.stop_string_prior`); a small LRU."""

    def __init__(self, prior, size: int = 32):
        self.prior, self.size = prior, size
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, settings: Settings):
        from posterior.priors.stop import stop_string_prior

        key = (settings.temperature, settings.top_k, settings.top_p, settings.stop, settings.stop_token_ids, settings.min_tokens,
               settings.repetition_penalty)  # fmt: skip
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        base = self.prior
        if (settings.temperature, settings.top_k, settings.top_p) != (base.temperature, base.top_k, base.top_p):
            try:
                base = base.with_sampling(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
            except ValueError as e:
                raise BadRequest("temperature", f"this server's prior cannot take these sampling parameters: {e}") from None
        if settings.min_tokens or settings.repetition_penalty != 1.0:
            from posterior.priors.penalties import penalized_prior

            try:
                base = penalized_prior(base, min_tokens=settings.min_tokens, repetition_penalty=settings.repetition_penalty,
                                       end_token_ids=settings.stop_token_ids)  # fmt: skip
            except ValueError as e:
                field = "min_tokens" if settings.min_tokens else "repetition_penalty"
                raise BadRequest(field, f"this server's prior cannot take it: {e}") from None
        prior = stop_string_prior(base, list(settings.stop), list(settings.stop_token_ids))
        with self._lock:
            self._cache[key] = prior
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return prior


class _PrefixValueCaches:
    """One :class:`~posterior.serve.logprobs.PrefixValues` (its cache of log Z^ per prefix) per
    (request prior, reward, beta, rollouts, horizon); a small LRU."""

    def __init__(self, rewards: _Rewards, size: int = 8):
        self.rewards, self.size = rewards, size
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, scorer, settings: Settings) -> PrefixValues:
        key = (id(scorer), settings.reward, settings.beta, settings.particles, settings.horizon)
        with self._lock:
            if key in self._cache and self._cache[key][0] is scorer:
                self._cache.move_to_end(key)
                return self._cache[key][1]
        values = PrefixValues(scorer, self.rewards.get(settings.reward), settings.beta, settings.particles, settings.horizon)
        with self._lock:
            self._cache[key] = (scorer, values)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return values


def _chat_renderer(prior):
    """messages -> prompt text through the tokenizer's chat template, or None without one."""
    tok = getattr(prior, "tokenizer", None)
    if tok is None or getattr(tok, "chat_template", None) is None:
        return None
    bos = tok.bos_token
    # The prior encodes prompts with add_special_tokens=True; if that already adds BOS, a BOS the
    # template writes as text would appear twice.
    adds_bos = bos is not None and tok.bos_token_id is not None and tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]

    def render(messages):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if adds_bos and text.startswith(bos):
            text = text[len(bos) :]
        return text

    return render


def create_app(prior, *, config: ServeConfig | None = None):
    """The FastAPI app serving ``prior``; the sampler worker starts and stops with the app's
    lifespan (uvicorn, or ``fastapi.testclient.TestClient`` used as a context manager).

    ``prior`` must not wrap prompts in a chat template itself (``chat=False``): completions take raw
    text and ``/v1/chat/completions`` applies the template.
    """
    from posterior.posterior import Posterior
    from posterior.priors.base import ROW_STREAMS, Prior
    from posterior.rewards.registry import REWARDS
    from posterior.samplers.registry import get_method, sampler_options

    config = config or ServeConfig()
    if not isinstance(prior, Prior):
        raise ValueError(f"prior must be a posterior prior, got {type(prior).__name__}")
    if getattr(prior, "chat", False):
        raise ValueError("serve a prior made with chat=False: /v1/chat/completions applies the chat template itself")
    rewards = _Rewards(prior)
    priors = _Priors(prior)
    prefix_values = _PrefixValueCaches(rewards)
    render_chat = _chat_renderer(prior)
    eos = set(prior.eos_token_ids)
    cleans_spaces = bool(getattr(getattr(prior, "tokenizer", None), "clean_up_tokenization_spaces", False))
    started = now()

    def encode(prompt: str) -> list[int]:
        return prior.encode_prompts([prompt])[0]

    # --- the worker's side ---------------------------------------------------------------------
    def run(settings: Settings, prompts, seed, callback):
        p = priors.get(settings)
        if settings.max_tokens == 0:  # echo only: score the prompts, sample nothing
            served, used = Served(None, [[0] * settings.n for _ in prompts], [["length"] for _ in prompts], "echo"), seed
        else:
            post = Posterior(p, rewards.get(settings.reward), settings.beta)
            options = dict(settings.options)
            if callback is not None:
                options["callback"] = callback
            res = post.sample(n=settings.runs, method=settings.method, max_new_tokens=settings.max_tokens, prompts=list(prompts),
                              seed=seed, **options)  # fmt: skip
            stopped = p.hit if settings.stop else None
            served, used = choose(res, settings, choice_seeds(res.seed, len(prompts)), eos=p.eos_token_ids, stopped=stopped), res.seed
        if settings.logprobs is not None or settings.echo:
            served = _score(served, p, settings, prompts)
        return served, used

    def _score(served: Served, p, settings: Settings, prompts) -> Served:
        """Attach the prior's token log-probs of the returned tokens (logprobs) and of the prompts
        (echo); the stop strings change no token before the stop, so the unstopped prior scores."""
        k = settings.logprobs or 0
        from posterior.priors.stop import SequenceStopPrior, StepwiseStopPrior

        scorer = p.base if isinstance(p, (StepwiseStopPrior, SequenceStopPrior)) else p  # the penalties stay
        ids = [q.ids if isinstance(q, Prompt) and q.ids is not None else prior.encode_prompts([q])[0] for q in prompts]
        scored = {}
        contexts_of = {}
        if served.result is not None and settings.logprobs is not None:
            res = served.result
            keys = sorted({(q, j) for q in range(len(prompts)) for j in served.picks[q]})
            seqs = [visible(p, res.tokens[q, j, : res.lengths[q, j]].tolist()) for q, j in keys]
            contexts_of = {q: prior.encode_prompts([str(prompts[q])])[0] for q in range(len(prompts))}
            contexts = [contexts_of[q] for q, _ in keys]
            scored = dict(zip(keys, forced(scorer, contexts, seqs, k)))
        echoed = [echo_scores(scorer, i, k) for i in ids] if settings.echo else None
        log_prob = None
        if settings.context_tokens is not None and settings.reward is not None:
            log_prob = [_log_prob(scorer, settings, i, q) for q, i in enumerate(ids)]
        token_se = None
        if settings.token_logprobs == "posterior" and settings.reward is not None:
            values = prefix_values.get(scorer, settings)
            token_se = [0.0] * len(prompts)
            if echoed is not None:
                for q, sc in enumerate(echoed):
                    echoed[q], token_se[q] = tilted(sc, [], values)
            for (q, j), sc in list(scored.items()):
                scored[(q, j)], se = tilted(sc, contexts_of[q], values)
                token_se[q] = max(token_se[q], se)
        return dataclasses.replace(served, scored=scored, echoed=echoed, log_prob=log_prob, token_se=token_se)

    def _log_prob(scorer, settings: Settings, ids: list[int], q: int) -> tuple[float, float, float]:
        """log pi*(x | c) for the context c = ids[:context_tokens] and the complete continuation
        x = the rest + EOS: log pi0(x | c) + r(x)/beta - log Z(c), with Z over continuations of at
        most max(max_tokens, len(x)) tokens, bracketed by ``pst.bounds`` (its estimates and z=3
        widened ends). Returns (estimate, lower, upper)."""
        from posterior.bounds import bounds
        from posterior.seeds import derive_seed

        c = settings.context_tokens
        context, cont = ids[:c], ids[c:]
        eos0 = scorer.eos_token_ids[0]
        lp = sum(forced(scorer, [context], [cont + [eos0]], 0)[0].logprobs)
        reward = rewards.get(settings.reward)
        r = float(reward([scorer.decode(cont)])[0])
        post = Posterior(scorer, reward, settings.beta)
        method = settings.method if settings.method in ("is", "smc") else "smc"
        b = bounds(post, n=settings.particles, repeats=8, max_new_tokens=max(settings.max_tokens, len(cont) + 1),
                   prompts=[scorer.decode(context)], method=method, seed=derive_seed(sum(ids) + 31 * len(ids), f"serve-log-prob-{q}"))  # fmt: skip
        tilt = lp + r / settings.beta
        lo_z, hi_z = float(b.log_Z_lower[0]), float(b.log_Z_upper[0])
        return tilt - 0.5 * (lo_z + hi_z), tilt - hi_z, tilt - lo_z

    def make_callback(jobs: list[Job], offsets: list[int]):
        settings: Settings = jobs[0].settings
        if "callback" not in sampler_options(settings.method):
            return None
        prefix = settings.method == "smc" and not rewards.get(settings.reward).needs_prompts and not _scores_tokens(settings)
        trackers = {id(j): PrefixTracker(len(j.prompts) * settings.n, cleans_spaces=cleans_spaces, stops=settings.stop) for j in jobs}

        def callback(report):
            abort_when_all_cancelled(jobs)
            if not prefix:
                return
            for job, off in zip(jobs, offsets):
                if not job.stream or job.cancelled.is_set():
                    continue
                deltas = {}
                for k in range(len(job.prompts)):  # every choice is drawn from the particles alive at the end
                    lw = report.log_weights[off + k].tolist()
                    deltas.update(trackers[id(job)].update_shared(k * settings.n, settings.n, report.texts[off + k], lw))
                if deltas:
                    job.sent_deltas = True
                    job.emit("delta", deltas)

        return callback

    def per_prompt_seeds(settings: Settings) -> bool:
        """Whether a call of these settings takes one seed per prompt (seeded requests batched):
        the method draws per-prompt streams, and so does the request's prior."""
        if settings.max_tokens == 0 or rewards.get(settings.reward).needs_prompts:
            return False
        return get_method(settings.method).streams and priors.get(settings).has(ROW_STREAMS)

    batcher = Batcher(run, make_callback=make_callback, error_status=error_status, window_s=config.window_s,
                      max_batch_prompts=config.max_batch_prompts, max_queue=config.max_queue,
                      per_prompt_seeds=per_prompt_seeds)  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:  # uvicorn has drained the requests in flight by now
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="posterior", summary="OpenAI-compatible sampling of pi*(x) ∝ pi0(x)·exp(r(x)/beta)", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # fmt: skip
    app.state.batcher, app.state.config = batcher, config

    def error(status: int, message: str, param: str | None = None, headers=None, code=None):
        return JSONResponse(_error_body(status, message, param, code), status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # a failing request never takes the server down
        log.exception("request failed")
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    def authorised(request) -> bool:
        if config.api_key is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), config.api_key.encode())

    # --- endpoints -------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "waiting": batcher.waiting, "running": batcher.running,
                "calls": batcher.calls, "aborted": batcher.aborted}  # fmt: skip

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "posterior", "max_model_len": prior.max_length}

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request):
            return unauthorised()
        return {"object": "list", "data": [model_card(name) for name in config.model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        if not authorised(request):
            return unauthorised()
        if model_id not in config.model_names:
            return error(404, f"The model `{model_id[:200]}` does not exist or you do not have access to it.", "model", code="model_not_found")
        return model_card(model_id)

    async def _json_body(request):
        raw = await _read_body(request, config.max_body_bytes)
        if raw is None:
            raise BadRequest("body", f"larger than this server's limit of {config.max_body_bytes} bytes (--max-body-bytes)", 413)
        try:
            body = json.loads(raw)
        except (RecursionError, ValueError) as e:
            raise BadRequest("body", f"not valid JSON ({str(e)[:200]})") from None
        if not isinstance(body, dict):
            raise BadRequest("body", "must be a JSON object")
        check_json(body)
        model = body.get("model")
        if model is not None and model not in config.model_names:
            raise BadRequest("model", f"The model `{str(model)[:200]}` does not exist or you do not have access to it.", 404,
                             code="model_not_found", plain=True)  # fmt: skip
        return body

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's /tokenize: {prompt} or {messages} -> {count, max_model_len, tokens}; the ids are
        those the sampler conditions on (``add_special_tokens`` as the prior encodes prompts)."""
        if not authorised(request):
            return unauthorised()
        try:
            body = await _json_body(request)
            extra = sorted(set(body) - {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"})
            if extra:
                raise BadRequest(extra[0], "unknown field")
            if "messages" in body:
                from posterior.serve.protocol import _render

                text = await asyncio.to_thread(_render, body["messages"], render_chat)
            else:
                text = body.get("prompt")
                if not isinstance(text, str):
                    raise BadRequest("prompt", f"must be a string, got {type(text).__name__}")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise BadRequest("add_special_tokens", f"must be a bool, got {special!r}")
            tok = getattr(prior, "tokenizer", None)
            try:
                if special or tok is None:
                    ids = await asyncio.to_thread(encode, text)
                else:
                    ids = list((await asyncio.to_thread(tok, text, add_special_tokens=False))["input_ids"])
            except ValueError as e:
                raise BadRequest("prompt", str(e)) from None
        except BadRequest as e:
            return error(e.status, str(e), e.field, code=e.code)
        out = {"count": len(ids), "max_model_len": prior.max_length, "tokens": ids, "token_strs": None}
        if body.get("return_token_strs"):
            out["token_strs"] = [prior.decode([i]) for i in ids]
        return out

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        """vLLM's /tokenizer_info (lm-eval's remote tokenizer reads it): special tokens and the
        chat template."""
        if not authorised(request):
            return unauthorised()
        tok = getattr(prior, "tokenizer", None)
        return {"tokenizer_class": type(tok).__name__ if tok is not None else type(prior).__name__,
                "eos_token": getattr(tok, "eos_token", None), "bos_token": getattr(tok, "bos_token", None),
                "pad_token": getattr(tok, "pad_token", None), "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": prior.max_length}  # fmt: skip

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """vLLM's /detokenize: {tokens} -> {prompt}."""
        if not authorised(request):
            return unauthorised()
        try:
            body = await _json_body(request)
            extra = sorted(set(body) - {"model", "tokens"})
            if extra:
                raise BadRequest(extra[0], "unknown field")
            from posterior.serve.protocol import _token_ids

            ids = _token_ids("tokens", body.get("tokens") if isinstance(body.get("tokens"), list) else [None], prior.vocab_size)
        except BadRequest as e:
            return error(e.status, str(e), e.field, code=e.code)
        return {"prompt": await asyncio.to_thread(prior.decode, ids)}

    def unauthorised():
        return error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                     headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def handle(request, chat: bool):
        if not authorised(request):
            return unauthorised()
        raw = await _read_body(request, config.max_body_bytes)
        if raw is None:
            return error(413, f"body: larger than this server's limit of {config.max_body_bytes} bytes (--max-body-bytes)", "body")
        try:
            body = json.loads(raw)
        except RecursionError:  # the C decoder recurses once per level: 100,000 "[" end here
            return error(400, f"body: nested deeper than this server's limit of {MAX_JSON_DEPTH} levels", "body")
        except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of more than 4300 digits
            return error(400, f"body: not valid JSON ({str(e)[:200]})", "body")
        try:
            parsed = await asyncio.to_thread(
                parse_request, body, config, chat=chat, encode=encode, context=prior.max_length,
                reward_names=set(REWARDS), render_chat=render_chat, sampling=(prior.temperature, prior.top_k, prior.top_p),
                vocab_size=prior.vocab_size, decode=prior.decode,
            )  # fmt: skip
            await asyncio.to_thread(_reward_or_400, parsed.settings.reward)
            if parsed.settings.token_logprobs == "posterior" and parsed.settings.reward is not None:
                if (await asyncio.to_thread(rewards.get, parsed.settings.reward)).needs_prompts:
                    raise BadRequest("posterior.token_logprobs", f"'posterior' needs a reward of the text alone; "
                                     f"{parsed.settings.reward!r} reads the prompt apart")  # fmt: skip
            await asyncio.to_thread(priors.get, parsed.settings)
        except BadRequest as e:
            return error(e.status, str(e), e.field, code=e.code)
        prompts = [Prompt.of(t, ids if parsed.settings.echo else None) for t, ids in zip(parsed.prompts, parsed.prompt_ids)]
        job = Job(parsed.settings, prompts, parsed.seed, stream=parsed.stream).bind(asyncio.get_running_loop())
        try:
            batcher.submit(job)
        except QueueFull as e:
            return error(429, f"server busy: {e}", headers={"Retry-After": "1"})
        if parsed.stream:
            return StreamingResponse(_stream(job, parsed, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()  # dropped if waiting; its call aborted if nobody else needs it
                    return Response(status_code=499)
                continue
            if event[0] == "error":
                return error(event[1], event[2])
            if event[0] == "done":
                return JSONResponse(_complete(parsed, event[1], chat))

    def _reward_or_400(spec):
        try:
            rewards.get(spec)
        except ValueError as e:
            raise BadRequest("posterior.reward", str(e)) from None
        except ImportError as e:  # the reward's optional package is not installed on this server
            raise BadRequest("posterior.reward", f"reward {spec!r} needs an optional package this server lacks: {e}", 501) from None

    # --- response bodies -------------------------------------------------------------------------
    def _choices(parsed: Parsed, outcome):
        served: Served = outcome.result
        res, n = served.result, parsed.settings.n
        for k in range(len(parsed.prompts)):
            p = outcome.first + k
            for i in range(n):
                j = served.picks[p][i]
                text = "" if res is None else res.texts[p][j]
                yield k * n + i, text, served.finish[p][j], choice_stats(served, p, i)

    def token_text(i: int) -> str:
        return "" if i in eos else prior.decode([i])  # EOS carries no text (vLLM writes "")

    def _logprobs(parsed: Parsed, outcome, chat: bool) -> list:
        """Per choice: its logprobs object (None unless asked), echo's prompt scores first."""
        served: Served = outcome.result
        out = []
        for k in range(len(parsed.prompts)):
            p = outcome.first + k
            for i in range(parsed.settings.n):
                if parsed.settings.logprobs is None:
                    out.append(None)
                    continue
                sc = served.scored.get((p, served.picks[p][i]), Scored([], [], []))
                if served.echoed is not None:
                    sc = join(served.echoed[p], sc)
                out.append(chat_logprobs(token_text, sc) if chat else completion_logprobs(token_text, sc))
        return out

    def _usage(parsed: Parsed, outcome) -> dict:
        eos = set(priors.get(parsed.settings).eos_token_ids)
        done = sum(completion_tokens(outcome.result, outcome.first + k, eos) for k in range(len(parsed.prompts)))
        prompt = sum(parsed.prompt_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def _summary(parsed: Parsed, outcome) -> dict:
        return summary(outcome.result, outcome.first, len(parsed.prompts), settings=parsed.settings, seed=outcome.seed,
                       requests=outcome.requests, prompts=outcome.prompts, many=parsed.many)  # fmt: skip

    def _complete(parsed: Parsed, outcome, chat: bool) -> dict:
        choices = []
        logprobs = _logprobs(parsed, outcome, chat)
        for idx, text, reason, stats in _choices(parsed, outcome):
            if parsed.settings.echo:
                text = parsed.prompts[idx // parsed.settings.n] + text
            c = {"index": idx, "finish_reason": reason, "logprobs": logprobs[idx], "posterior": stats}
            c.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(c)
        return {
            "id": new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": now(),
            "model": config.model_name,
            "choices": choices,
            "usage": _usage(parsed, outcome),
            "posterior": _summary(parsed, outcome),
        }

    async def _stream(job: Job, parsed: Parsed, chat: bool):
        """Every chunk carries choices (OpenAI clients read ``chunk.choices[0]``), except the usage
        chunk that ``stream_options.include_usage`` asks for, which is OpenAI's ``choices: []``."""
        cid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        total = len(parsed.prompts) * parsed.settings.n
        scores = _scores_tokens(parsed.settings)
        prefix = parsed.settings.method == "smc" and parsed.settings.reward is not None and not scores

        def chunk(choices, **extra):
            return _sse({"id": cid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                         "model": config.model_name, "choices": choices, **extra})  # fmt: skip

        def delta(idx, text, reason=None, stats=None, role=False, logprobs=None):
            c = {"index": idx, "finish_reason": reason, "logprobs": logprobs}
            if chat:
                c["delta"] = {"role": "assistant", "content": text} if role else {"content": text}
            else:
                c["text"] = text
            if stats is not None:
                c["posterior"] = stats
            return c

        if prefix:
            note = "smc: text every surviving particle shares is sent as it is fixed"
        elif scores:
            note = ("logprobs / echo: the tokens are scored when the run ends; then each choice is sent token by token "
                    "with its log-probs (not incremental)")  # fmt: skip
        else:
            note = f"{parsed.settings.method}: no text is known before the run ends; it is sent when done (not incremental)"
        sent = [""] * total
        try:
            yield chunk([delta(i, "", role=True) for i in range(total)], posterior={"stream": "prefix" if prefix else "final", "note": note})
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    out = []
                    for idx, text in sorted(event[1].items()):
                        sent[idx] += text
                        out.append(delta(idx, text))
                    if out:
                        yield chunk(out)
                elif event[0] == "error":
                    yield _sse(_error_body(event[1], event[2]))
                    return
                elif scores:  # the whole answer at once: each choice's tokens with their log-probs
                    outcome = event[1]
                    logprobs, out = _logprobs(parsed, outcome, chat), []
                    for idx, text, reason, stats in _choices(parsed, outcome):
                        if parsed.settings.echo:
                            text = parsed.prompts[idx // parsed.settings.n] + text
                        if logprobs[idx] is None:  # echo without logprobs: the text only
                            out.append(delta(idx, text, reason, stats))
                            continue
                        *pieces, (rest, last) = stream_pieces(text, logprobs[idx], chat=chat)
                        for piece, lp in pieces:
                            yield chunk([delta(idx, piece, logprobs=lp)])
                        out.append(delta(idx, rest, reason, stats, logprobs=last))
                    yield chunk(out, posterior=_summary(parsed, outcome))
                    if parsed.include_usage:
                        yield chunk([], usage=_usage(parsed, outcome))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    outcome = event[1]
                    out = []
                    for idx, text, reason, stats in _choices(parsed, outcome):
                        if not text.startswith(sent[idx]):  # the fixed-prefix argument failed: say so
                            log.error("streamed text %r is not a prefix of choice %d's final text %r", sent[idx], idx, text)
                            yield _sse(_error_body(500, f"internal error: streamed text of choice {idx} is not a prefix of its final text"))
                            return
                        out.append(delta(idx, text[len(sent[idx]) :], reason, stats))
                    yield chunk(out, posterior=_summary(parsed, outcome))
                    if parsed.include_usage:
                        yield chunk([], usage=_usage(parsed, outcome))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel()  # the client went away (or we are done): its result is no longer wanted

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


async def _read_body(request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``limit`` bytes: from its
    Content-Length header before reading anything, else while it streams in (chunked bodies)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, allow_nan=False)}\n\n"


__all__ = ["create_app", "ServeConfig", "error_status"]
