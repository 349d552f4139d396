"""OpenAI request bodies in, OpenAI response bodies out, with the ``posterior`` extension.

Requests (``/v1/completions``: ``prompt``; ``/v1/chat/completions``: ``messages``) are checked
here before anything runs; a bad one raises :class:`BadRequest` naming the field. What a request
may ask for is bounded by :class:`ServeConfig`, fixed at start: the body's size (413 above
``max_body_bytes``, checked before parsing), the model, which rewards (registry names: those that
read no file and load no model, :data:`SAFE_REWARDS`, always; the others, :data:`GATED_REWARDS` and
rewards registered by the caller, only with ``allow_reward_paths``), ``n`` and ``max_tokens``
limits, and method options as JSON scalars only (options that take Python objects, ``callback``,
``proposal`` of "is"/"qrs", ``init_texts``, are refused).

A body is JSON of at most :data:`MAX_JSON_DEPTH` levels of nesting whose strings are valid Unicode
(JSON can write a lone UTF-16 surrogate, ``"\ud800"``, which no text can hold), and a number is a
number a float can hold (JSON integers are unbounded: ``1`` followed by 400 zeros is not a beta):
each refused with a 400 naming the field, never a 500.

The request's ``model`` must be one of the served names (``/v1/models``; absent: the first),
else 404 in OpenAI's shape (``code: "model_not_found"``).

Choices are aligned (``posterior`` object) by default. What the ``n`` choices are, per method:

- ``is``, ``smc``: a weighted population of ``posterior.particles`` particles (default: the
  server's ``--particles``, 16) is drawn, and the n choices are n independent draws from it by
  weight (multinomial resampling): each choice is a sample of pi*, exact as particles grow. ESS,
  log Z, KL and reward_mean describe the population. Each choice's ``posterior.particle`` names the
  particle it is, ``particle_log_weight`` its weight in the population; ``log_weight`` is -log n
  (the choices are equally weighted draws).
- ``bon``, ``soft_bon``: one answer per draw set, n answers; the draw set has ``particles`` prior
  draws (``best_of``; an explicit ``options.best_of`` wins).
- ``mh``, ``pgibbs``: n chains, the choices are their states (pgibbs runs ``particles`` particles
  per conditional SMC sweep); ``rejection``, ``qrs``: n accepted draws. These take no population
  (``particles`` is refused for mh, rejection and qrs).
- no ``posterior`` object: n prior draws.

Sampling parameters are the prior's, per request: ``temperature``, ``top_p`` (and vLLM's
``top_k``) define pi0 for that request (absent: the server's ``--temperature`` / ``--top-p`` /
``--top-k``); requests with different ones never share a sampler call. ``temperature: 0`` asks for
a deterministic answer of the aligned posterior, not the prior's greedy text: the population is
drawn at the server's temperature and every choice is its highest-weight text (weights of
samples with equal text summed): an estimate of pi*'s mode (``"choices": "mode"``). ``stop`` (up to
4 strings) and ``stop_token_ids`` make the prior end there as at EOS
(:mod:`posterior.priors.stop`): every sampler and the reward see the stopped text, the stop text is
not returned, and ``finish_reason`` is "stop". vLLM's ``min_tokens`` and ``repetition_penalty``
are part of the request's prior too (:mod:`posterior.priors.penalties`: sampling and scoring read
the same modified distribution; a prior without next-token distributions refuses them, 400).
Fields that would change pi0 in ways not supported (``logit_bias``, presence / frequency
penalties) or are not computed are refused (400).

``posterior.token_logprobs`` ("prior", the default, or the server's ``--token-logprobs``; or
"posterior") says what ``logprobs`` / ``echo`` report, and ``posterior.horizon`` the longest text
(prompt included) the "posterior" values' pi* is over (:mod:`posterior.serve.logprobs`). A request
without a ``posterior`` object gets the server's ``--default-posterior`` when it has one.

Responses carry, per choice, ``posterior: {reward, log_weight, log_prior, particle,
particle_log_weight}`` and, top level, ``posterior: {method, reward, beta, particles, choices,
log_Z, ess, kl, reward_mean, seconds, seed, ...}``. log_Z, ess, kl and reward_mean are Monte Carlo
estimates from the population (``"estimate": true``); they are scalars for a one-prompt request and
lists (one per prompt) when ``prompt`` is a list. JSON has no infinities: a reward of -inf (the
text is ruled out) and a log-weight of -inf (weight 0) are sent as null.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any


# Rewards a request may name without ``allow_reward_paths``: they read no file a request names and
# load no model (lexicons their packages install; "judge" asks the served model itself). An
# ensemble is allowed when all its members are.
SAFE_REWARDS = frozenset({"sentiment", "negative-sentiment", "contains", "afinn", "textblob", "length", "repetition",
                          "judge", "ensemble"})  # fmt: skip
# The built-in rewards that need ``allow_reward_paths``, and why.
GATED_REWARDS = {
    "classifier": "reads the model folder the request names",
    "classifier-logit": "reads the model folder the request names",
    "similarity": "loads an encoder model",
}
# Deepest nesting of objects and lists a body may have (an OpenAI body needs 4).
MAX_JSON_DEPTH = 32
# Method options that take Python objects (or belong to the server): never from a request.
REFUSED_OPTIONS = {"callback": None, "init_texts": None, "proposal": ("is", "qrs")}
# OpenAI fields accepted and ignored, and fields accepted only at the value that means "off".
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls"})
ONLY_DEFAULT = {
    "suffix": (None, ""), "best_of": (None, 1),
    "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
    "functions": (None, []), "function_call": (None, "none"), "modalities": (None, ["text"]),
}  # fmt: skip
WHY_FIXED: dict[str, str] = {}
# What a returned token's log-prob is (posterior.token_logprobs): log pi0, or the telescoped log pi*
# estimate of :mod:`posterior.serve.logprobs`.
TOKEN_LOGPROBS = frozenset({"prior", "posterior"})
# Methods whose n choices are drawn by weight from a population of ``particles``.
POPULATION_METHODS = frozenset({"is", "smc"})
# Methods whose ``particles`` sets a method option (the population behind each answer).
PARTICLES_OPTION = {"bon": "best_of", "soft_bon": "best_of", "pgibbs": "particles"}


class BadRequest(ValueError):
    """A request the server refuses; ``field`` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str, status: int = 400, code: str | None = None, plain: bool = False):
        super().__init__(message if plain else f"{field}: {message}")
        self.field, self.message, self.status, self.code = field, message, status, code


@dataclass(frozen=True)
class ServeConfig:
    """What the server allows; fixed at start (``posterior serve`` options)."""

    model_name: str = "posterior"  # the name /v1/models lists first, responses carry and requests may use
    aliases: tuple[str, ...] = ()  # further names requests may use (vLLM's several --served-model-name)
    max_n: int = 64  # largest n (choices) per prompt
    default_particles: int = 16  # population of a request's posterior (posterior.particles absent)
    max_particles: int = 256  # largest posterior.particles
    max_tokens: int | None = None  # largest max_tokens (None: the model's context bounds it)
    default_max_tokens: int = 16  # OpenAI's default for completions
    max_prompts: int = 16  # largest list of prompts in one /v1/completions request
    max_option_int: int = 4096  # largest integer method option (steps, best_of, ...): bounds a request's work
    allow_reward_paths: bool = False  # also allow GATED_REWARDS (classifier:PATH, classifier-logit:, similarity:) and registered ones
    window_s: float = 0.02  # batching window
    max_batch_prompts: int = 32  # most prompts per sampler call
    max_queue: int = 64  # most requests waiting; more get 429
    api_key: str | None = None  # Bearer key; None: no authentication
    # Largest request body, checked before parsing (413 above it). 1 MiB holds 16 prompts of 8k
    # tokens of plain text; raise it for longer contexts or heavily escaped (non-ASCII) prompts.
    max_body_bytes: int = 1 << 20
    token_logprobs: str = "prior"  # posterior.token_logprobs of a posterior object that does not say (--token-logprobs)
    default_posterior: str | None = None  # JSON of the posterior object of a request without one (--default-posterior)

    def __post_init__(self):
        for name in ("max_n", "default_particles", "max_particles", "default_max_tokens", "max_prompts", "max_option_int", "max_batch_prompts", "max_queue",
                     "max_body_bytes"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {self.max_tokens!r}")
        if not (isinstance(self.window_s, (int, float)) and not isinstance(self.window_s, bool) and self.window_s >= 0):
            raise ValueError(f"window_s must be a number >= 0, got {self.window_s!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or None")
        if self.default_particles > self.max_particles:
            raise ValueError(f"default_particles={self.default_particles} is above max_particles={self.max_particles}")
        if not isinstance(self.aliases, tuple) or not all(isinstance(a, str) and a for a in self.aliases):
            raise ValueError(f"aliases must be a tuple of non-empty strings, got {self.aliases!r}")
        if self.token_logprobs not in TOKEN_LOGPROBS:
            raise ValueError(f"token_logprobs must be one of {sorted(TOKEN_LOGPROBS)}, got {self.token_logprobs!r}")
        if self.default_posterior is not None:
            import json

            try:
                obj = json.loads(self.default_posterior)
            except ValueError as e:
                raise ValueError(f"default_posterior must be a JSON posterior object, got {self.default_posterior!r:.80} ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"default_posterior must be a JSON object, got {self.default_posterior!r:.80}")

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.aliases)


@dataclass(frozen=True)
class Settings:
    """Everything that defines a sampler call except prompts and seed (hashable: the batching key).
    ``reward`` None: no ``posterior`` object, plain prior samples (method "is", r = 0, beta = 1)."""

    reward: str | None
    beta: float
    method: str
    options: tuple[tuple[str, Any], ...]
    n: int
    max_tokens: int
    particles: int = 16  # the population (POPULATION_METHODS; PARTICLES_OPTION's option)
    temperature: float = 1.0  # the prior's, for this request
    top_k: int | None = None
    top_p: float | None = None
    mode: bool = False  # temperature 0: every choice is the highest-weight sequence
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: no log-probs; k: each token's and its k most likely alternatives'
    echo: bool = False  # the prompt (and its token log-probs, first null) before the completion
    context_tokens: int | None = None  # with echo: the prompt's first tokens are the context, the rest the continuation
    min_tokens: int = 0  # vLLM's: no EOS / stop token before this many tokens (posterior.priors.penalties)
    repetition_penalty: float = 1.0  # vLLM's, on the prior's log-probs (posterior.priors.penalties)
    token_logprobs: str = "prior"  # "posterior": logprobs / echo values are log pi* estimates (posterior.serve.logprobs)
    horizon: int | None = None  # with token_logprobs "posterior": texts of at most this many tokens (None: the model's context)

    @property
    def population(self) -> bool:
        """True when the choices are drawn from a weighted population (or its mode)."""
        return self.reward is None and self.mode or self.reward is not None and self.method in POPULATION_METHODS

    @property
    def runs(self) -> int:
        """Samples per prompt of the sampler call."""
        return self.particles if self.population else self.n

    @property
    def sampling(self) -> dict:
        return {"temperature": 0.0 if self.mode else self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "stop": list(self.stop), "stop_token_ids": list(self.stop_token_ids), "min_tokens": self.min_tokens,
                "repetition_penalty": self.repetition_penalty}  # fmt: skip


@dataclass(frozen=True)
class Parsed:
    settings: Settings
    prompts: list[str]
    prompt_tokens: list[int]  # per prompt
    seed: int | None
    stream: bool
    include_usage: bool
    many: bool  # ``prompt`` was a list: per-prompt numbers are lists
    prompt_ids: list[list[int]] = dataclasses.field(default_factory=list)  # per prompt (as given, for token-id prompts and echo)


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
def _int(body: dict, name: str, default, lo: int, hi: int | None, why_hi: str = "", field: str | None = None) -> int:
    field = field or name
    v = body.get(name, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise BadRequest(field, f"must be an int >= {lo}, got {shown(v)}")
    if hi is not None and v > hi:
        raise BadRequest(field, f"is {shown(v)}, above this server's limit of {hi}{why_hi}")
    return v


def shown(v) -> str:
    """``repr(v)`` for an error message, an integer too long to read given by its digits."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**30:
        return f"{'a negative' if v < 0 else 'an'} integer of {len(str(abs(v)))} digits"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _as_float(v) -> float | None:
    """``v`` as a float, or None where it is not a number a float can hold (JSON's integers are
    unbounded: 10**400 has no float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def check_json(body, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse (400, naming the field) a parsed body nested deeper than ``max_depth`` or holding a
    string (value or key) that is not valid Unicode (a lone surrogate). Iterative: no recursion limit."""
    stack = [(body, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            _check_text(where, value)
        elif isinstance(value, (dict, list)):
            if depth >= max_depth:
                raise BadRequest(where or "body", f"is nested deeper than this server's limit of {max_depth} levels")
            for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
                child = f"{where}[{k}]" if isinstance(k, int) else (f"{where}.{_printable(k)}" if where else _printable(k))
                if isinstance(k, str):
                    _check_text(child, k)
                stack.append((v, child, depth + 1))


def _printable(key: str) -> str:
    """A field name for an error message: at most 40 characters, lone surrogates escaped (an error
    body holding one could not be written as UTF-8)."""
    return key[:40].encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text(where: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(
            where, f"is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start} (JSON \\u escapes must pair)"
        ) from None


def _check_openai_fields(body: dict, handled: set[str]) -> None:
    for k, v in body.items():
        if k in handled or k in IGNORED:
            continue
        if k in ONLY_DEFAULT:
            if v is None or v in ONLY_DEFAULT[k]:
                continue
            why = WHY_FIXED.get(k, "this server samples pi* and does not support it")
            raise BadRequest(k, f"{v!r} is not supported: {why}")
        raise BadRequest(k, "unknown field")


def parse_posterior(obj, config: ServeConfig, *, n: int, max_tokens: int, reward_names) -> Settings:
    """The ``posterior`` object (or None: prior samples) as Settings; errors name the field."""
    from posterior.samplers import SAMPLERS, sampler_options  # SAMPLERS with the built-ins registered

    if obj is None:
        return Settings(None, 1.0, "is", (), n, max_tokens, particles=config.default_particles)
    if not isinstance(obj, dict):
        raise BadRequest("posterior", f"must be an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"reward", "beta", "method", "options", "particles", "context_tokens", "token_logprobs", "horizon"})
    if unknown:
        raise BadRequest(f"posterior.{unknown[0]}", "unknown field; posterior takes reward, beta, method, particles, options, "
                         "context_tokens, token_logprobs, horizon")  # fmt: skip
    token_logprobs = obj.get("token_logprobs", config.token_logprobs)
    if token_logprobs not in TOKEN_LOGPROBS:
        raise BadRequest("posterior.token_logprobs", f"must be one of {sorted(TOKEN_LOGPROBS)}, got {shown(token_logprobs)}")
    horizon = obj.get("horizon")
    if horizon is not None:
        horizon = _int(obj, "horizon", None, 1, None, field="posterior.horizon")
    context_tokens = obj.get("context_tokens")
    if context_tokens is not None:
        context_tokens = _int(obj, "context_tokens", None, 1, None, field="posterior.context_tokens")
    reward = obj.get("reward")
    if not isinstance(reward, str) or not reward:
        raise BadRequest("posterior.reward", f"must be a reward spec string (e.g. 'sentiment', 'contains:WORD'), got {reward!r}")
    name = reward.partition(":")[0]
    if name not in reward_names:
        raise BadRequest("posterior.reward", f"unknown reward {name!r}; registered: {', '.join(sorted(reward_names))}")
    if not config.allow_reward_paths:
        _check_allowed(reward)
    beta = obj.get("beta", 0.1)
    value = _as_float(beta)
    if value is None or not math.isfinite(value) or value <= 0:
        raise BadRequest("posterior.beta", f"must be a finite number > 0, got {shown(beta)}")
    method = obj.get("method", "is")
    if not isinstance(method, str) or method not in SAMPLERS:
        raise BadRequest("posterior.method", f"unknown method {method!r}; choose one of {sorted(SAMPLERS)}")
    options = obj.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest("posterior.options", f"must be an object of method options, got {type(options).__name__}")
    known = sampler_options(method)
    for k, v in options.items():
        field = f"posterior.options.{k}"
        if k not in known:
            raise BadRequest(field, f"method {method!r} has no option {k!r}; its options are {sorted(known)}")
        refused = REFUSED_OPTIONS.get(k, ())
        if k in REFUSED_OPTIONS and (refused is None or method in refused):
            raise BadRequest(field, "takes a Python object and cannot be set over HTTP")
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise BadRequest(field, f"must be a number, string, bool or null, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise BadRequest(field, f"must be finite, got {v!r}")
        default = known[k]  # an option whose default has a type takes that type (ints for floats too)
        if v is not None and default is not None and not _same_kind(v, default):
            raise BadRequest(field, f"takes {type(default).__name__} values (default {default!r}), got {shown(v)}")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > config.max_option_int:
            raise BadRequest(field, f"is {shown(v)}, outside this server's limit of ±{config.max_option_int} for integer options")
    particles = obj.get("particles")
    if particles is not None:
        particles = _int(obj, "particles", None, 1, config.max_particles, " (--max-particles)", field="posterior.particles")
        if method not in POPULATION_METHODS and method not in PARTICLES_OPTION:
            raise BadRequest("posterior.particles", f"method {method!r} has no population: its n choices are its own "
                             f"(chains or accepted draws); leave particles out")  # fmt: skip
    option = PARTICLES_OPTION.get(method)
    if option is not None:
        given = options.get(option)
        if particles is not None and given is not None and given != particles:
            raise BadRequest("posterior.particles", f"is {particles} but options.{option} is {given!r}; give one of them")
        if given is None:
            options = {**options, option: particles if particles is not None else config.default_particles}
        particles = options[option]
    elif particles is None:
        particles = config.default_particles
    return Settings(reward, value, method, tuple(sorted(options.items())), n, max_tokens, particles=particles,
                    context_tokens=context_tokens, token_logprobs=token_logprobs, horizon=horizon)


def _check_allowed(spec: str) -> None:
    """Refuse (400 ``posterior.reward``) a reward that reads a file or loads a model, or that is not
    a built-in one known not to, when the server was started without ``allow_reward_paths``."""
    from posterior.rewards.registry import spec_names

    try:
        names = spec_names(spec)
    except ValueError as e:
        raise BadRequest("posterior.reward", str(e)) from None
    for name in names:
        if name in SAFE_REWARDS:
            continue
        why = GATED_REWARDS.get(name, "is not a built-in reward known to read no file and load no model")
        what = f"reward {name!r}" + ("" if name == spec.partition(":")[0] else f" in {shown(spec)}")
        raise BadRequest(
            "posterior.reward", f"{what} {why}, which this server does not allow (start it with --allow-reward-paths); "
            f"allowed: {', '.join(sorted(SAFE_REWARDS))}",
        )  # fmt: skip


def _same_kind(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def parse_request(body, config: ServeConfig, *, chat: bool, encode, context: int | None, reward_names, render_chat=None,
                  sampling=(1.0, None, None), vocab_size: int | None = None, decode=None) -> Parsed:  # fmt: skip
    """Check a request body; ``encode(prompt) -> token ids`` (for the context check),
    ``render_chat(messages) -> prompt text`` for chat requests, ``sampling`` the server prior's
    (temperature, top_k, top_p): a request's defaults."""
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object")
    check_json(body)
    model = body.get("model")
    if model is not None and model not in config.model_names:
        raise BadRequest("model", f"The model `{shown(model) if not isinstance(model, str) else model[:200]}` does not exist or "
                         f"you do not have access to it. This server serves {', '.join(map(repr, config.model_names))}.",
                         404, code="model_not_found", plain=True)  # fmt: skip
    common = {"model", "n", "max_tokens", "seed", "stream", "posterior", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
              "logprobs", "top_logprobs", "min_tokens", "repetition_penalty"}  # fmt: skip
    given_ids: list[list[int] | None] = []
    if chat:
        prompts = [_render(body.get("messages"), render_chat)]
        many = False
        handled = common | {"messages", "max_completion_tokens"}
        given_ids = [None]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]  # one prompt of token ids (OpenAI: an array of tokens)
            many = False
        else:
            many = isinstance(prompt, list)
        prompts = prompt if isinstance(prompt, list) else [prompt]
        if not prompts:
            raise BadRequest("prompt", "is an empty list")
        if len(prompts) > config.max_prompts:
            raise BadRequest("prompt", f"has {len(prompts)} prompts, above this server's limit of {config.max_prompts}")
        texts = []
        for i, p in enumerate(prompts):
            where = f"prompt[{i}]" if many else "prompt"
            if isinstance(p, list):  # token ids: checked, then decoded (the sampler takes text)
                ids = _token_ids(where, p, vocab_size)
                text = decode(ids) if decode is not None else None
                if text is None:
                    raise BadRequest(where, "token-id prompts need a prior with a tokenizer")
                given_ids.append(ids)
                p = text
            elif not isinstance(p, str):
                raise BadRequest(where, f"must be a string or a list of token ids, got {type(p).__name__}")
            else:
                given_ids.append(None)
            if not p:
                raise BadRequest(where, "is empty")
            texts.append(p)
        prompts = texts
        handled = common | {"prompt", "echo"}
    _check_openai_fields(body, handled)
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise BadRequest("echo", f"must be a bool, got {shown(echo)}")
    logprobs = _logprobs(body, chat)
    n = _int(body, "n", 1, 1, config.max_n, " (--max-n)")
    temperature, top_k, top_p, mode = _sampling(body, sampling)
    stop, stop_ids = _stops(body, vocab_size)
    min_tokens = _int(body, "min_tokens", 0, 0, None)
    repetition_penalty = _number(body, "repetition_penalty", 0.0, 100.0, lo_open=True)
    repetition_penalty = 1.0 if repetition_penalty is None else repetition_penalty
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise BadRequest("seed", f"must be an int in [0, 2**64) or null, got {seed!r}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("stream", f"must be a bool, got {stream!r}")
    so = body.get("stream_options") or {}
    include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
    ids_of = []
    for i, (p, given) in enumerate(zip(prompts, given_ids)):
        where = "messages" if chat else (f"prompt[{i}]" if many else "prompt")
        try:
            ids = encode(p)
        except ValueError as e:
            raise BadRequest(where, str(e)) from None
        if given is not None and ids != given and ids[len(ids) - len(given) :] != given:
            raise BadRequest(where, f"these token ids do not come back from their own text (they decode to {shown(p)}, which "
                             f"encodes to other ids): the sampler takes text; send the text")  # fmt: skip
        ids_of.append(given if given is not None and echo else ids)
    mt_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    limit = config.max_tokens if config.max_tokens is not None else context
    default = config.default_max_tokens
    if chat and context is not None:  # OpenAI's chat default: the rest of the context (bounded by --max-tokens)
        default = max(1, context - max(len(ids) for ids in ids_of))
        default = default if config.max_tokens is None else min(default, config.max_tokens)
    elif chat and config.max_tokens is not None:
        default = config.max_tokens
    max_tokens = _int(body, mt_name, default, 0 if echo else 1, limit, " (--max-tokens or the model's context)" if echo else
                      " (--max-tokens or the model's context; 0 only with echo)")  # fmt: skip
    obj = body.get("posterior")
    if obj is None and config.default_posterior is not None:
        import json

        obj = json.loads(config.default_posterior)
    settings = parse_posterior(obj, config, n=n, max_tokens=max_tokens, reward_names=reward_names)
    settings = dataclasses.replace(settings, temperature=temperature, top_k=top_k, top_p=top_p, mode=mode, stop=stop,
                                   stop_token_ids=stop_ids, logprobs=logprobs, echo=echo, min_tokens=min_tokens,
                                   repetition_penalty=repetition_penalty)  # fmt: skip
    if min_tokens > max_tokens and max_tokens > 0:
        raise BadRequest("min_tokens", f"is {min_tokens}, above max_tokens={max_tokens}")
    if settings.context_tokens is not None:
        if not echo:
            raise BadRequest("posterior.context_tokens", "needs echo: true (it splits the echoed prompt into context and continuation)")
        for i, ids in enumerate(ids_of):
            if not settings.context_tokens < len(ids):
                raise BadRequest("posterior.context_tokens", f"is {settings.context_tokens} but prompt {i} has {len(ids)} tokens: "
                                 "the continuation after the context would be empty")  # fmt: skip
    if settings.token_logprobs == "posterior":
        if stop or stop_ids:
            raise BadRequest("stop" if stop else "stop_token_ids", "cannot be combined with posterior.token_logprobs 'posterior'")
        horizon = settings.horizon if settings.horizon is not None else context
        if horizon is None:
            raise BadRequest("posterior.horizon", "is needed with token_logprobs 'posterior' (this model states no context length)")
        longest = max(len(ids) for ids in ids_of) + max_tokens
        if longest > horizon:
            raise BadRequest("posterior.horizon", f"is {horizon} tokens but prompt + max_tokens has {longest}: pi* is over texts "
                             "of at most horizon tokens, prompt included")  # fmt: skip
        settings = dataclasses.replace(settings, horizon=horizon)
    for i, ids in enumerate(ids_of):
        where = "messages" if chat else (f"prompt[{i}]" if many else "prompt")
        if context is not None and len(ids) + max_tokens > context:
            raise BadRequest(
                where, f"has {len(ids)} tokens; with max_tokens={max_tokens} that exceeds the model's context of {context} tokens"
            )
    return Parsed(settings, list(prompts), [len(ids) for ids in ids_of], seed, stream, include_usage, many, ids_of)


def _token_ids(where: str, ids: list, vocab_size: int | None) -> list[int]:
    if not ids:
        raise BadRequest(where, "is an empty list of token ids")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
            raise BadRequest(where, f"token ids must be ints in [0, {vocab_size}), got {shown(t)}")
    return list(ids)


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token the request wants (None: no log-probs). Completions:
    ``logprobs`` an int in [0, 5]; chat: ``logprobs: true`` and ``top_logprobs`` in [0, 20]."""
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if lp is not None and not isinstance(lp, bool):
            raise BadRequest("logprobs", f"must be a bool in chat completions, got {shown(lp)}")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
            raise BadRequest("top_logprobs", f"must be an int in [0, 20], got {shown(top)}")
        if top is not None and not lp:
            raise BadRequest("top_logprobs", "needs logprobs: true")
        return (top or 0) if lp else None
    if top is not None:
        raise BadRequest("top_logprobs", "is a chat completions field; completions take logprobs: K")
    if lp is None or lp is False:
        return None
    if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5:
        raise BadRequest("logprobs", f"must be an int in [0, 5] (alternatives per token), got {shown(lp)}")
    return lp


def _number(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    x = _as_float(v)
    if x is None or not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        where = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise BadRequest(name, f"must be a number in {where}, got {shown(v)}")
    return x


def _sampling(body: dict, defaults) -> tuple[float, int | None, float | None, bool]:
    """(temperature, top_k, top_p, mode) of the request's prior; absent fields take the server's."""
    from posterior.validate import check_sampling

    temperature, top_k, top_p = defaults
    t = _number(body, "temperature", 0.0, 100.0)
    mode = t == 0.0
    if t is not None and not mode:
        try:
            check_sampling(t, None, None)
        except ValueError as e:
            raise BadRequest("temperature", str(e)) from None
        temperature = t
    p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    if p is not None:
        top_p = None if p == 1.0 else p
    k = body.get("top_k")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < -1:
            raise BadRequest("top_k", f"must be an int >= 1, or -1 or 0 for none (vLLM's), got {shown(k)}")
        top_k = None if k <= 0 else k
    return temperature, top_k, top_p, mode


def _stops(body: dict, vocab_size: int | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    from posterior.priors.stop import check_stops

    try:
        stop = check_stops(body.get("stop") or None, None)[0]  # "" and [] mean none
    except ValueError as e:
        raise BadRequest("stop", str(e)) from None
    try:
        ids = check_stops(None, body.get("stop_token_ids"), vocab_size)[1]
    except ValueError as e:
        raise BadRequest("stop_token_ids", str(e)) from None
    return stop, ids


def _render(messages, render_chat) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{i}].role", f"must be system, user or assistant, got {m.get('role') if isinstance(m, dict) else m!r}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content):
                raise BadRequest(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content", f"must be a string, got {type(content).__name__}")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise BadRequest(f"messages[{i}].{extra[0]}", "is not supported")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if render_chat is None:
        raise BadRequest("messages", "this model has no chat template; use /v1/completions")
    try:
        return render_chat(clean)
    except Exception as e:  # noqa: BLE001 - a template may reject a message order
        raise BadRequest("messages", f"the chat template refused them: {e}") from None


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------
def finite(x: float) -> float | None:
    """A float for JSON: None for -inf / +inf / NaN."""
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Served:
    """A sampler call's result and the choices drawn from it.

    ``picks[p][i]`` is the sample (particle) of prompt p that is choice i; ``finish[p][j]`` is
    "stop" where sample j ended at EOS, a stop token or a stop string, else "length"."""

    result: Any  # SampleResult; None for echo with max_tokens 0 (nothing sampled)
    picks: list[list[int]]  # (P, n)
    finish: list[list[str]]  # (P, N)
    how: str  # "resampled" | "mode" | "independent" | "echo"
    scored: dict = dataclasses.field(default_factory=dict)  # (p, j) -> logprobs.Scored of sample j's returned tokens
    echoed: list | None = None  # per prompt: logprobs.Scored of its own tokens (echo)
    log_prob: list | None = None  # per prompt: (estimate, lower, upper) of log pi*(continuation | context)
    token_se: list | None = None  # per prompt, token_logprobs "posterior": the largest se of the log Z^ its values use


class Prompt(str):
    """A prompt's text that carries the token ids a client sent (echo scores those ids); ``ids``
    is None for a text prompt."""

    ids: list[int] | None = None

    @classmethod
    def of(cls, text: str, ids: list[int] | None) -> "Prompt":
        out = cls(text)
        out.ids = ids
        return out


def choice_seeds(seed, count: int) -> list[int]:
    """The seeds of the choice draws of a call's ``count`` prompts: from each prompt's own seed
    (``seed`` a list: per-prompt seeds, so a prompt's choices do not depend on its batch), else
    from the call's seed and the prompt's position."""
    from posterior.seeds import derive_seed

    if isinstance(seed, (list, tuple)):
        return [derive_seed(s, "serve-choices") for s in seed]
    return [derive_seed(seed, f"serve-choices-{p}") for p in range(count)]


def choose(result, settings: Settings, seeds: list[int], *, eos, stopped=None) -> Served:
    """The n choices of every prompt of a call (the module docstring's semantics).

    Resampled: n multinomial draws by weight, prompt p's from a generator seeded with ``seeds[p]``
    (:func:`choice_seeds`), so a seeded call picks the same choices again.
    Mode: the text of largest total weight (samples of equal text pooled), n times.
    ``stopped(token_ids) -> bool`` says whether a sequence's text was cut at a stop string."""
    import torch

    from posterior.samplers.resampling import get_resampler

    eos = set(eos)
    P, N = result.lengths.shape
    tokens, lengths = result.tokens.tolist(), result.lengths.tolist()
    finish = []
    for p in range(P):
        row = []
        for j in range(N):
            L = lengths[p][j]
            seq = tokens[p][j][:L]
            ended = L > 0 and seq[-1] in eos or (stopped is not None and stopped(seq))
            row.append("stop" if ended else "length")
        finish.append(row)
    n = settings.n
    if settings.mode:
        result.check_samples("choices")
        picks = []
        for p in range(P):
            total: dict = {}
            first: dict = {}
            for j, w in enumerate(result.log_weights[p].double().softmax(0).tolist()):
                key = result.texts[p][j]  # the answer a client sees: equal texts pooled
                total[key] = total.get(key, 0.0) + w
                first.setdefault(key, j)
            best = max(total, key=lambda k: (total[k], -first[k]))
            picks.append([first[best]] * n)
        return Served(result, picks, finish, "mode")
    if settings.population:
        result.check_samples("choices")
        resample = get_resampler("multinomial")
        picks = []
        for p in range(P):
            g = torch.Generator(device="cpu").manual_seed(seeds[p])
            picks.append(resample(result.log_weights[p : p + 1].double().cpu(), n, generator=g)[0].tolist())
        return Served(result, picks, finish, "resampled")
    return Served(result, [list(range(n)) for _ in range(P)], finish, "independent")


def choice_stats(served: Served, p: int, i: int) -> dict:
    res, j = served.result, served.picks[p][i]
    if res is None:
        return {"reward": None, "log_weight": None, "log_prior": None, "particle": None, "particle_log_weight": None}
    drawn = served.how != "independent"
    return {
        "reward": finite(res.rewards[p, j]),
        "log_weight": -math.log(len(served.picks[p])) if drawn else finite(res.log_weights[p, j]),
        "log_prior": finite(res.log_prior[p, j]),
        "particle": j,
        "particle_log_weight": finite(res.log_weights[p, j]),
    }


def completion_tokens(served: Served, p: int, eos: set[int]) -> int:
    """Tokens of prompt p's choices, a final EOS not counted (OpenAI counts the text's tokens)."""
    res, out = served.result, 0
    if res is None:
        return 0
    for j in served.picks[p]:
        L = int(res.lengths[p, j])
        out += L - (L > 0 and int(res.tokens[p, j, L - 1]) in eos)
    return out


def summary(served: Served, outcome_first: int, count: int, *, settings: Settings, seed, requests: int, prompts: int, many: bool) -> dict:
    """The response's top-level ``posterior`` object for prompts first .. first + count - 1."""
    out = _summary(served, outcome_first, count, settings=settings, seed=seed, requests=requests, prompts=prompts, many=many)
    if served.log_prob is not None:
        rows = served.log_prob[outcome_first : outcome_first + count]
        est = [finite(e) for e, _, _ in rows]
        bracket = [[finite(lo), finite(hi)] for _, lo, hi in rows]
        out["log_prob"] = est if many else est[0]
        out["log_prob_bracket"] = bracket if many else bracket[0]
        out["log_prob_note"] = ("log pi*(continuation + EOS | context) = log pi0 + r/beta - log Z(context); log Z from "
                                "pst.bounds (z=3 widened ends): an estimate and its bracket")  # fmt: skip
    if served.token_se is not None:
        se = [finite(x) for x in served.token_se[outcome_first : outcome_first + count]]
        out["token_logprobs"] = {
            "of": "posterior", "estimate": True, "horizon": settings.horizon, "samples": settings.particles,
            "log_Z_se": se if many else se[0],
            "note": "each token's log-prob is log pi0 + log Z^(prefix with it) - log Z^(prefix before it), Z^ an importance-"
                    "sampling estimate from K prior rollouts: any span's sum estimates log pi*(span | text before it); "
                    "log_Z_se is the largest standard error of the log Z^ used (delta method), per prompt",
        }  # fmt: skip
    return out


def _summary(served: Served, outcome_first: int, count: int, *, settings: Settings, seed, requests: int, prompts: int, many: bool) -> dict:
    result = served.result
    if result is None:  # echo with max_tokens 0: nothing was sampled
        return {"method": None, "reward": settings.reward, "beta": settings.beta, "prior_only": settings.reward is None,
                "particles": None, "choices": "echo", "sampling": settings.sampling, "seed": seed,
                "batch": {"requests": requests, "prompts": prompts}}  # fmt: skip
    rows = range(outcome_first, outcome_first + count)
    kl = result.kl()
    rm = result.reward_mean()

    def per(fn):
        vals = [fn(p) for p in rows]
        return vals if many else vals[0]

    return {
        "method": result.method,
        "reward": settings.reward,
        "beta": settings.beta,
        "options": dict(settings.options),
        "prior_only": settings.reward is None,
        "targets_posterior": bool(result.targets_posterior),
        "particles": int(result.lengths.shape[1]) if settings.population else None,
        "choices": served.how,
        "sampling": settings.sampling,
        "estimate": True,  # log_Z, ess, kl, reward_mean are estimates from the population
        "log_Z": per(lambda p: None if result.log_Z is None else finite(result.log_Z[p])),
        "ess": per(lambda p: finite(result.ess[p])),
        "kl": per(lambda p: None if kl is None else finite(kl[p])),
        "reward_mean": per(lambda p: finite(rm[p]) if result.targets_posterior else None),
        "seconds": result.seconds,
        "seed": seed,
        "batch": {"requests": requests, "prompts": prompts},
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


__all__ = ["BadRequest", "GATED_REWARDS", "TOKEN_LOGPROBS", "MAX_JSON_DEPTH", "POPULATION_METHODS", "Parsed", "Prompt", "SAFE_REWARDS", "ServeConfig",
           "Served", "Settings", "check_json", "choice_seeds", "choose", "parse_request", "summary"]
