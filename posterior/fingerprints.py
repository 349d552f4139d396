"""Content fingerprints of priors, rewards, Python functions and model files: what a run was made of.

A resumable run (a training checkpoint, ``posterior/train/checkpoint.py``; a batch job,
``posterior/batch/jobs.py``) records these so that resuming it with something else is refused
instead of mixing two posteriors. They are cheap and deterministic (the same objects give the same
strings in every process: SHA-256, never Python's salted ``hash``):

* prior (:func:`prior_fingerprint`): a model's parameters and buffers (names, shapes, dtypes and
  an evenly strided sample of up to 16384 values per tensor: ~0.2 s for SmolLM2-135M's 163M values
  on a loaded 2-core machine, where a pass over every value took ~1.7 s); a ``CallablePrior``'s
  vocabulary and its next-token log-probabilities after the empty prefix and after each single
  token (rounded to 1e-4). It detects other weights (another checkpoint, any fine-tuning that
  moves most values) or another next-token function; it cannot detect a change confined to values
  outside the sample (a few edited rows of a large matrix), nor, for a callable prior, a change
  that shows only after two or more tokens (:func:`code_fingerprint` of its function does). Other
  priors (vLLM) enter by their description and vocabulary only (:func:`files_fingerprint` of the
  model folder covers their weights).
* reward (:func:`reward_fingerprint`): its name (a ``Callable`` reward: the function's module and
  qualified name) and its values on a fixed probe of texts (:data:`PROBE_TEXTS` and the prior's
  first tokens; for a reward that reads prompts, bound to each of the first 4 prompts), rounded to
  9 significant digits. It detects another function or scale wherever the probe texts differ; it
  cannot detect rewards that agree on every probe text, and a reward that is random (a sampled
  judge) would differ on every call.
* code (:func:`code_fingerprint`): the bytecode, constants, defaults, closure values and the
  plain-data globals of every Python function an object holds (a ``Callable`` reward's function,
  a ``CallablePrior``'s next-token function, a ``functools.partial``'s arguments, the terms of a sum
  of rewards, a user's ``Reward`` subclass), so two lambdas that agree on the probe texts, or one
  function closing over other values, differ. Library objects (models, tokenizers) enter by type,
  tensors and modules by :func:`tensors_digest`. Bytecode changes with the Python version.
* model files (:func:`files_fingerprint`): the relative names and sizes of a model folder's files
  (or one file) and 17 evenly spaced 4 KiB blocks of each: new weights saved into the same folder
  differ before anything loads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import types

PROBE_TEXTS = (
    "", " ", "a", "b", "ab", "the", "0", "yes", "no", "Hello, world!", "This is great.", "This is terrible.",
    "I love it", "I hate it",
)  # fmt: skip
PROBE_TOKENS = 16  # also probe the texts of the prior's first tokens
PROBE_PROMPTS = 4  # a reward that reads prompts is probed bound to its first prompts
TENSOR_SAMPLE = 1 << 14  # values sampled per tensor (every value of smaller ones)
CODE_DEPTH = 8  # nesting followed by code_fingerprint (functions in closures in partials ...)
FILE_BLOCKS, FILE_BLOCK = 17, 1 << 12  # blocks sampled per file by files_fingerprint, and their size
# Objects of these libraries enter code_fingerprint by type only (their contents are models,
# tokenizers, engines: covered by the weights digests and the reward's probe values).
LIBRARY_MODULES = ("torch", "transformers", "tokenizers", "numpy", "vllm", "sentence_transformers", "vaderSentiment",
                   "textblob", "afinn", "llama_cpp", "ray", "accelerate", "peft", "trl")  # fmt: skip


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def tensors_digest(named_tensors) -> str:
    """Names, shapes, dtypes and a strided sample of each tensor (see the module docstring)."""
    import torch

    def parts():
        for name, t in named_tensors:
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // TENSOR_SAMPLE)
            sample = flat[::step].to("cpu", torch.float64)
            yield (name, tuple(t.shape), str(t.dtype))
            yield sample.numpy().tobytes()

    return _digest(parts())


def prior_fingerprint(prior) -> dict:
    """Name, description and a content fingerprint of a prior (JSON-safe)."""
    import torch

    from posterior.priors.callable import CallablePrior

    desc = {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in prior.describe().items()}
    model = getattr(prior, "model", None)
    if isinstance(model, torch.nn.Module):
        content = "weights " + tensors_digest(list(model.state_dict().items()))
    elif isinstance(prior, CallablePrior):
        eos = set(prior.eos_token_ids)
        probes = [[]] + [[v] for v in range(prior.vocab_size) if v not in eos][:PROBE_TOKENS]
        with torch.no_grad():
            lp = prior.start(probes, copies=1).logprobs.double()  # (B, V)
        rounded = torch.round(lp.clamp(min=-1e6) * 1e4).long()  # -inf as -1e6: a token the prior forbids
        content = "next_logprobs " + _digest([tuple(prior.vocab), rounded.numpy().tobytes()])
    else:
        content = "vocabulary " + _digest([prior.vocabulary_key()])
    return {"name": desc.pop("model", None) or type(prior).__name__, "describe": json.dumps(desc, sort_keys=True), "fingerprint": content}


def reward_name(reward) -> str:
    from posterior.rewards.base import Callable

    if isinstance(reward, Callable):
        fn = reward.fn
        qual = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        return f"{reward.name} [{qual}]"
    return reward.name


def reward_fingerprint(reward, prior, prompts) -> dict:
    """Name and a fingerprint of the reward's values on :data:`PROBE_TEXTS` (JSON-safe)."""
    eos = set(prior.eos_token_ids)
    texts = list(PROBE_TEXTS) + [prior.decode([v]) for v in range(prior.vocab_size) if v not in eos][:PROBE_TOKENS]
    if reward.needs_prompts:
        bound = [reward.for_prompt(p or "", i) for i, p in enumerate((prompts or [None])[:PROBE_PROMPTS])]
    else:
        bound = [reward]
    parts = []
    for r in bound:
        try:
            parts.append(tuple(f"{v:.9g}" for v in r(texts).tolist()))
        except Exception as e:  # a reward that refuses a probe text still has a fingerprint: which error
            parts.append(f"raised {type(e).__name__}")
    return {"name": reward_name(reward), "fingerprint": _digest(parts)}


# --------------------------------------------------------------------------------------------------
# Code: a function's bytecode, constants, defaults, closure and plain-data globals
# --------------------------------------------------------------------------------------------------
_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def code_fingerprint(obj) -> str:
    """A digest of ``obj``'s Python functions and the values they close over (module docstring).

    ``obj`` is a function, a ``functools.partial``, a bound method, a reward or prior (their
    attributes are followed), or plain data; cycles and nesting beyond :data:`CODE_DEPTH` are cut."""
    return _digest(_parts(obj, 0, set()))


def _library(tp: type) -> bool:
    return (getattr(tp, "__module__", "") or "").split(".")[0] in LIBRARY_MODULES


def _parts(v, depth: int, seen: set):
    import torch  # (this module imports torch only when a fingerprint needs it: files_fingerprint does not)

    if isinstance(v, _PLAIN):  # subclasses (numpy's float64, an IntEnum) enter as their plain value
        base = next(t for t in _PLAIN if isinstance(v, t))
        yield (base.__name__, repr(v if type(v) is base else base(v)))
        return
    if isinstance(v, (torch.dtype, torch.device)):
        yield ("torch", str(v))
        return
    if depth > CODE_DEPTH:
        yield ("too deep", type(v).__qualname__)
        return
    if id(v) in seen:  # a function that refers to itself, a reward holding its parent ...
        yield ("cycle", type(v).__qualname__)
        return
    seen = seen | {id(v)}
    d = depth + 1
    if isinstance(v, torch.Tensor):
        yield ("tensor", tensors_digest([("", v)]))
    elif isinstance(v, torch.nn.Module):
        yield ("module", type(v).__qualname__, tensors_digest(list(v.state_dict().items())))
    elif type(v).__module__ == "numpy" and hasattr(v, "dtype"):
        yield ("numpy", str(v.dtype), tuple(getattr(v, "shape", ())))
        try:
            yield ("values", tensors_digest([("", torch.as_tensor(v))]))
        except (TypeError, RuntimeError, ValueError):  # strings, objects
            yield ("repr", repr(v.tolist()))
    elif isinstance(v, (list, tuple)):
        yield (type(v).__name__, len(v))
        for x in v:
            yield from _parts(x, d, seen)
    elif isinstance(v, (set, frozenset)):  # iteration order of a set of str depends on the hash seed
        yield (type(v).__name__, tuple(sorted(_digest(_parts(x, d, seen)) for x in v)))
    elif isinstance(v, dict):
        yield ("dict", len(v))
        for k in sorted(v, key=repr):
            yield from _parts(k, d, seen)
            yield from _parts(v[k], d, seen)
    elif isinstance(v, types.CodeType):
        yield ("code", v.co_name, v.co_code, v.co_names, v.co_varnames, v.co_freevars, v.co_argcount, v.co_kwonlyargcount)
        for c in v.co_consts:
            yield from _parts(c, d, seen)
    elif isinstance(v, types.FunctionType):
        yield ("function", v.__module__, v.__qualname__)
        yield from _parts(v.__code__, d, seen)
        yield from _parts(v.__defaults__, d, seen)
        yield from _parts(v.__kwdefaults__, d, seen)
        for cell in v.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned after the function was made)
                yield ("empty cell",)
                continue
            yield from _parts(value, d, seen)
        for name in sorted(_global_names(v.__code__)):
            if name in v.__globals__:
                g = v.__globals__[name]
                if isinstance(g, (*_PLAIN, tuple, list, dict, torch.Tensor)) or (
                    isinstance(g, types.FunctionType) and g.__module__ == v.__module__  # the user's own helpers
                ):
                    yield ("global", name)
                    yield from _parts(g, d, seen)
    elif isinstance(v, functools.partial):
        yield ("partial",)
        yield from _parts(v.func, d, seen)
        yield from _parts(v.args, d, seen)
        yield from _parts(v.keywords, d, seen)
    elif isinstance(v, types.MethodType):
        yield ("method",)
        yield from _parts(v.__func__, d, seen)
        yield from _parts(v.__self__, d, seen)
    elif isinstance(v, (types.BuiltinFunctionType, types.ModuleType, type)):
        yield (type(v).__name__, getattr(v, "__module__", None), getattr(v, "__qualname__", getattr(v, "__name__", "?")))
    else:
        yield from _object_parts(v, d, seen)


def _global_names(code: types.CodeType) -> set:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def _object_parts(v, depth: int, seen: set):
    """A reward or prior, or a user's callable object: its type, its class's own code when the
    class is the user's, and its attributes. A library object (a tokenizer): its type only."""
    from posterior.priors.base import Prior
    from posterior.priors.callable import CallablePrior
    from posterior.rewards.base import Reward

    tp = type(v)
    yield ("object", tp.__module__, tp.__qualname__)
    if _library(tp):
        return
    if isinstance(v, Prior) and not isinstance(v, CallablePrior):
        yield ("prior", prior_fingerprint(v)["fingerprint"])  # its weights; not its tokenizer's internals
        return
    if not (isinstance(v, (Reward, CallablePrior)) or callable(v)):
        return
    if not tp.__module__.startswith("posterior."):  # a user's class: its methods are part of what it computes
        for klass in tp.__mro__:
            if klass.__module__.startswith("posterior.") or klass is object:
                break
            for name in sorted(k for k, f in vars(klass).items() if isinstance(f, types.FunctionType)):
                yield ("def", klass.__qualname__, name)
                yield from _parts(vars(klass)[name], depth, seen)
    attrs = getattr(v, "__dict__", None)
    if isinstance(attrs, dict):
        yield from _parts(attrs, depth, seen)


# --------------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------------
def files_fingerprint(path: str | os.PathLike) -> str:
    """Relative names and sizes of the files under ``path`` (a folder, or one file) and
    :data:`FILE_BLOCKS` evenly spaced blocks of each (module docstring). Hidden files and folders
    (``.cache``, ``.git``) are skipped."""
    path = os.fspath(path)
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)]
    else:
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            files += [(os.path.relpath(os.path.join(root, n), path), os.path.join(root, n)) for n in names if not n.startswith(".")]
    parts = []
    for rel, full in sorted(files):
        size = os.path.getsize(full)
        parts.append((rel, size))
        with open(full, "rb") as f:
            for k in range(FILE_BLOCKS):
                f.seek(max(0, size - FILE_BLOCK) * k // (FILE_BLOCKS - 1))
                parts.append(f.read(FILE_BLOCK))
    return _digest(parts)


__all__ = [
    "PROBE_PROMPTS", "PROBE_TEXTS", "PROBE_TOKENS", "TENSOR_SAMPLE", "code_fingerprint", "files_fingerprint",
    "prior_fingerprint", "reward_fingerprint", "reward_name", "tensors_digest",
]  # fmt: skip
