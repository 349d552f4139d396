"""Methods registered by name, so ``Posterior.sample(method="smc")`` is a lookup.

A method is ``Method(name, options, info, run)``: its options class (a frozen dataclass whose
fields carry defaults, checks and help: :mod:`posterior.samplers.options`), its info class (a
typed, frozen :class:`~posterior.results.Info`) and

    run(post, prompts, options, *, n, max_new_tokens, generator, progress) -> SampleResult

which receives the options already checked (``options`` an instance of the class). A new method is
one module that defines the three and calls :func:`register`. Calling a ``Method`` with keyword
options (``method(post, prompts, n=..., ess_threshold=0.3, ...)``) builds and checks its options
first, as ``Posterior.sample`` does.

``register_sampler(name)`` keeps registering plain functions ``fn(posterior, prompts, *, n,
max_new_tokens, generator, progress, **options)`` with keyword-only options: their options class is
made from the signature (defaults, no checks beyond the function's own). The built-in methods
(``BUILTIN_MODULES``, which need torch) register themselves when :func:`load_builtins` first
imports them; their options classes need no torch (:func:`options_for` answers without loading them).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from posterior.samplers.options import OPTIONS, Options

COMMON = ("n", "max_new_tokens", "generator", "progress")
BUILTIN_MODULES = ("best_of_n", "importance", "rejection", "smc", "mh", "pgibbs")  # posterior.samplers.<module>
_builtins_loaded = False


@dataclass(frozen=True)
class Method:
    """A sampling method: name, options class, info class and ``run`` (see the module docstring)."""

    name: str
    options: type[Options]
    info: type  # a subclass of posterior.results.Info
    run: Callable[..., Any]  # run(post, prompts, options, *, n, max_new_tokens, generator, progress)
    # run also takes per-prompt streams (posterior.streams.Streams, one per prompt) as ``generator``
    # and draws prompt p only from stream p: seeded prompts are then sampled in one batched run
    streams: bool = False

    def __post_init__(self):
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise TypeError(f"method {self.name!r}: options must be a subclass of posterior.samplers.options.Options, got {self.options!r}")
        params = inspect.signature(self.run).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        missing = [p for p in COMMON if p not in params and not takes_any]
        if missing:
            raise TypeError(f"method {self.name!r}: run must accept {missing}")

    def check_options(self, options: dict, *, error=TypeError) -> Options:
        """``options`` (keywords) as this method's checked options; an unknown name raises ``error``."""
        known = [f.name for f in dataclasses.fields(self.options)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise error(f"method {self.name!r} has no option(s) {unknown}; its options are {sorted(known)}")
        return self.options(**options)

    def __call__(self, post, prompts, *, n: int, max_new_tokens: int, generator, progress: bool = False, **options):
        return self.run(post, prompts, self.check_options(options), n=n, max_new_tokens=max_new_tokens, generator=generator, progress=progress)


SAMPLERS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Register ``method`` under ``method.name`` (replacing one of the same name)."""
    if not isinstance(method, Method):
        raise TypeError(f"register takes a Method(name, options, info, run), got {method!r}")
    SAMPLERS[method.name] = method
    return method


def _options_from_signature(name: str, fn) -> type[Options]:
    """An options class for a plain sampler function: its keyword-only options and their defaults."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    specs = []
    for p in params:
        if p.name in COMMON or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        specs.append((p.name, Any, dataclasses.field(default=default, metadata={"help": ""})))
    cls = dataclasses.make_dataclass(f"{name.title().replace('_', '')}Options", specs, bases=(Options,), frozen=True)
    cls.method = name
    return cls


def register_sampler(name: str):
    """Register a plain function ``fn(post, prompts, *, n, max_new_tokens, generator, progress, **options)``."""

    def deco(fn):
        params = inspect.signature(fn).parameters
        missing = [p for p in COMMON if p not in params]
        if missing:
            raise TypeError(f"sampler {name!r} must accept {missing}")
        from posterior.results import Info

        def run(post, prompts, options, *, n, max_new_tokens, generator, progress=False):
            return fn(post, prompts, n=n, max_new_tokens=max_new_tokens, generator=generator, progress=progress, **options.as_kwargs())

        register(Method(name, _options_from_signature(name, fn), Info, run))
        return fn

    return deco


def load_builtins() -> None:
    """Import the built-in methods (each registers itself), once."""
    global _builtins_loaded
    if not _builtins_loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(f"posterior.samplers.{module}")
        _builtins_loaded = True


def get_method(name: str) -> Method:
    if name not in SAMPLERS:
        load_builtins()
    if name not in SAMPLERS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


get_sampler = get_method  # the old name: a Method is called like the old sampler functions


def options_for(name: str) -> type[Options]:
    """The options class of method ``name`` (a frozen dataclass: defaults, checks, help). The
    built-in methods' classes need no torch: asking for them loads no sampler."""
    if name in SAMPLERS:
        return SAMPLERS[name].options
    if name in OPTIONS:
        return OPTIONS[name]
    return get_method(name).options


def sampler_options(name: str) -> dict[str, object]:
    """The method-specific options of a method with their defaults (from its options class)."""
    return options_for(name).defaults()


__all__ = [
    "BUILTIN_MODULES", "COMMON", "Method", "SAMPLERS", "get_method", "get_sampler", "load_builtins", "options_for",
    "register", "register_sampler", "sampler_options",
]  # fmt: skip
