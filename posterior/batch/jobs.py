"""Batch jobs: sample pi*(x | prompt) ∝ pi0(x | prompt) exp(r(x)/beta) for every prompt of a file,
one JSON line per prompt, resumable after any kill.

Seeds. Prompt ``i`` is sampled with its own seed

    seed_i = derive_seed(seed, "batch-prompt-i")  in [0, 2**63)

(``posterior.seeds``: SplitMix64 of the seed mixed with a hash of the stream name; Steele, Lea &
Flood 2014, "Fast splittable pseudorandom number generators"), in one ``Posterior.sample(prompts=[prompt_i], seed=seed_i)`` call. ``Posterior.sample`` draws every
prompt of a multi-prompt call from ONE generator, so a prompt's draws would depend on which
prompts share its call; one call per prompt makes a line depend on (seed, i, prompt, settings)
only — not on ``batch_size``, the worker count, the order prompts finish, or restarts. The seed
stays below 2**63 so it fits every seed type downstream (torch, vLLM's int64 request seeds).

Output. One line per prompt, in prompt order (Ray results are buffered until the lines before
them are written), with no timing in it, so an interrupted-and-resumed run ends with the same
bytes as an uninterrupted one. Each line is one ``os.write`` + ``fsync``. A kill can leave at most
the last line torn (no trailing newline); a restart truncates it away, reads the indices already
written, and samples the rest. A failed write (a full disk) removes its partial line and raises
:class:`WriteError`: the same call resumes once there is room.

Identity. ``OUT.meta.json`` records the settings (n, method, options, seed, a hash of the prompts
and their ids, and what the caller adds: the command line records its model options and a
fingerprint of the model folder's files) and, before the first line is written, the posterior
itself, by content: the prior's weights (or a callable prior's next-token values and code), the
reward's values on probe texts and its code and closure, and beta (``posterior.fingerprints``,
the fingerprints training checkpoints record). A restart whose settings or posterior differ is
refused, naming each difference, before anything is sampled; given a builder, the posterior is
built first (with Ray, every worker's is checked). An output that is not a regular file
(``/dev/stdout``, a pipe, ``/dev/full``) is streamed to: no settings file, no resume.

Line shape (strict JSON: a non-finite number is null, its value under "nonfinite"; "id" only when
the input line has one)::

    {"index": 0, "id": "q-17", "prompt": "The movie was", "seed": 3728..., "method": "smc",
     "samples": [{"text": ..., "log_weight": ..., "reward": ...}, ...],
     "log_Z": ..., "ess": ..., "kl": ..., "reward_mean": ..., "targets_posterior": true, "info": {...}}
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, Union

MASK64 = (1 << 64) - 1
META_SUFFIX = ".meta.json"
META_VERSION = 2  # 2: the posterior's identity is recorded (version 1 recorded settings only)
# Fields of the posterior's identity that a resume may be told to accept changed (allow_changes):
# a random reward differs on every probe, bytecode differs after a Python upgrade.
IDENTITY_FIELDS = ("prior", "prior.name", "prior.describe", "prior.fingerprint", "prior.code", "reward", "reward.name",
                   "reward.fingerprint", "reward.code")  # fmt: skip
# Per-prompt result entries left out of "info": timing would make resumed output differ.
_NOT_INFO = {"method", "beta", "n", "reward_mean", "reward_max", "ess", "log_Z", "kl", "seconds", "seed", "prior"}

Prompt = Union[str, list]  # a text, or chat messages [{"role": ..., "content": ...}, ...]


# --------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------
def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` in a job with ``seed``: in [0, 2**63), any ``seed`` in [0, 2**64)."""
    from posterior.seeds import derive_seed

    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    return derive_seed(seed, f"batch-prompt-{index}")


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike, format: str = "auto") -> list[Prompt]:
    """Prompts from a file: JSONL (``{"prompt": TEXT}`` or ``{"messages": [...]}`` per line, with
    an optional ``"id"``, which :func:`run` copies to the line's output) or plain text (one prompt
    per line). ``format`` "auto" takes JSONL for a ``.jsonl``/``.ndjson`` name and text otherwise.
    Blank lines are skipped; prompt indices count the prompts, from 0."""
    return [prompt for prompt, _ in read_items(path, format)]


def read_items(path: str | os.PathLike, format: str = "auto") -> list[tuple[Prompt, dict]]:
    """(prompt, fields kept in its output line: ``{"id": ...}`` or ``{}``) per prompt of a file."""
    path = Path(path)
    if format not in ("auto", "jsonl", "text"):
        raise ValueError(f"format must be 'auto', 'jsonl' or 'text', got {format!r}")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    if format == "auto":
        format = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text"
    items: list[tuple[Prompt, dict]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            items.append(_jsonl_item(line, path, lineno) if format == "jsonl" else (line, {}))
    if not items:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts")
    return items


def _jsonl_item(line: str, path: Path, lineno: int) -> tuple[Prompt, dict]:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f'{where}: each line must be an object with one of "prompt" or "messages"')
    return check_item(obj, where)


def check_item(obj, where: str) -> tuple[Prompt, dict]:
    """A prompt (text or messages) or an object ``{"prompt" | "messages": ..., "id": ...}``."""
    if not isinstance(obj, dict):
        return check_prompt(obj, where), {}
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError(f'{where}: each line must be an object with one of "prompt" or "messages"')
    prompt = check_prompt(obj["prompt"] if "prompt" in obj else obj["messages"], where)
    return prompt, ({"id": obj["id"]} if "id" in obj else {})


def check_prompt(prompt, where: str) -> Prompt:
    """A prompt is a non-empty str or a non-empty list of {"role": str, "content": str} messages."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{where}: empty prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return prompt
    raise ValueError(f'{where}: a prompt is a non-empty string or a list of {{"role", "content"}} messages, got {prompt!r}')


def prompts_digest(prompts: Sequence[Prompt], fields: Sequence[dict] = ()) -> str:
    """SHA-256 of the prompts, and of the fields their lines keep (ids) when there are any."""
    data = list(prompts) if not any(fields) else [[p, f] for p, f in zip(prompts, fields)]
    return hashlib.sha256(json.dumps(data, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# One prompt -> one line
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    """What every prompt of a job is sampled with (the worker side of a job)."""

    n: int = 16  # samples (particles, chains) per prompt
    method: str = "is"
    max_new_tokens: int = 32
    seed: int = 0  # the job's seed; prompt i uses prompt_seed(seed, i)
    options: dict = field(default_factory=dict)  # the method's own options


def sample_line(post, index: int, prompt: Prompt, spec: JobSpec, fields: dict | None = None) -> str:
    """Sample prompt ``index`` with its derived seed and return its output line (ending in "\\n");
    ``fields`` (the input line's ``{"id": ...}``) are kept in the line, after the index."""
    seed = prompt_seed(spec.seed, index)
    sampler_post, text = post, prompt
    if isinstance(prompt, list):
        sampler_post, text = _chat_view(post, prompt, index)
    res = sampler_post.sample(n=spec.n, method=spec.method, max_new_tokens=spec.max_new_tokens, prompts=[text],
                              seed=seed, **spec.options)  # fmt: skip
    s = res.summary()
    samples = [{"text": t, "log_weight": float(res.log_weights[0, i]), "reward": float(res.rewards[0, i])}
               for i, t in enumerate(res.texts[0])]  # fmt: skip
    first = lambda v: None if v is None else v[0]  # noqa: E731  (per-prompt lists of length 1)
    info = {k: v for k, v in s.items() if k not in _NOT_INFO and "seconds" not in k}
    record = {
        "index": index, **(fields or {}), "prompt": prompt, "seed": seed, "method": res.method, "samples": samples,
        "log_Z": first(s["log_Z"]), "ess": first(s["ess"]), "kl": first(s["kl"]),
        "reward_mean": first(s["reward_mean"]), "targets_posterior": res.targets_posterior, "info": info,
    }  # fmt: skip
    return dumps_strict(record) + "\n"


def _chat_view(post, messages: list, index: int):
    """(a Posterior over the same prior with chat wrapping off, the messages rendered as text)."""
    prior = post.prior
    tok = getattr(prior, "tokenizer", None)
    if tok is None or getattr(tok, "chat_template", None) is None:
        raise ValueError(f"prompt #{index} is chat messages but the prior's tokenizer has no chat template")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # encode_prompts adds the tokenizer's special tokens; a template that writes BOS itself would
    # then start with two.
    bos = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos) and tok.bos_token_id in tok("", add_special_tokens=True)["input_ids"]:
        text = text[len(bos):]
    if not getattr(prior, "chat", False):
        return post, text
    plain = copy.copy(prior)  # shares the model / engine; only the prompt wrapping differs
    plain.chat = False
    view = copy.copy(post)
    view.prior = plain
    return view, text


def dumps_strict(obj) -> str:
    """Compact strict JSON (fixed key order): non-finite floats become null, named in "nonfinite"."""
    reasons: dict[str, str] = {}
    clean = _strict(obj, "", reasons)
    if reasons:
        clean["nonfinite"] = reasons
    return json.dumps(clean, allow_nan=False, ensure_ascii=False, separators=(",", ":"), default=str)


def _strict(obj, path: str, reasons: dict):
    if isinstance(obj, float) and not math.isfinite(obj):
        reasons[path] = "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
        return None
    if isinstance(obj, dict):
        return {k: _strict(v, f"{path}.{k}" if path else str(k), reasons) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v, f"{path}[{i}]", reasons) for i, v in enumerate(obj)]
    if hasattr(obj, "tolist"):  # tensors, numpy values
        return _strict(obj.tolist(), path, reasons)
    return obj


# --------------------------------------------------------------------------------------------------
# The output file: repair, resume, append
# --------------------------------------------------------------------------------------------------
class WriteError(OSError):
    """Writing ``out`` or its settings file failed (a full disk, a device error). A partial line is
    removed, so every line in ``out`` is whole and the same call resumes once there is room."""


def meta_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + META_SUFFIX)


def is_stream(out: str | os.PathLike) -> bool:
    """Whether ``out`` is something to stream to rather than a file to resume: an existing device,
    pipe or socket (``/dev/full``, a FIFO), or a name that leads through /proc (``/dev/stdout``,
    ``/dev/fd/1``), which means whatever that descriptor is now. A folder is an error."""
    path = os.path.abspath(out)
    if os.path.isdir(path):
        raise ValueError(f"out {str(out)!r} is a folder; give a file name such as {os.path.join(str(out), 'samples.jsonl')!r}")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        return True
    if os.path.realpath(os.path.dirname(path)).startswith("/proc/"):
        return True
    for _ in range(40):  # the symlink chain of the name itself (/dev/stdout -> /proc/self/fd/1)
        if not os.path.islink(path):
            return False
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
        if path.startswith("/proc/"):
            return True
    return False


def _canonical(settings: dict) -> dict:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key, old value, new value) of every leaf that differs; nested keys are joined by dots."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def _said(diff) -> str:
    return "; ".join(f"{k}: was {a!r}, now {b!r}" for k, a, b in diff)


def _afresh(out: Path) -> str:
    return f"start afresh: delete {out} and {meta_path(out)} (or choose another output)"


def read_meta(out: str | os.PathLike) -> dict:
    """``out``'s settings file, or ``ValueError`` naming it when it is missing, damaged or of an
    older format (which did not record the posterior)."""
    out, meta = Path(out), meta_path(out)
    if not meta.exists():
        raise ValueError(f"{str(out)!r} exists but {str(meta)!r} does not, so its settings cannot be checked; move it away or choose another output")
    try:
        obj = json.loads(meta.read_bytes().decode("utf-8"))
        why = None if isinstance(obj, dict) and isinstance(obj.get("settings"), dict) else 'it holds no "settings" object'
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"not JSON: {e}"
    except OSError as e:
        why = f"unreadable: {e.strerror or e}"
    if why is None and not isinstance(obj.get("posterior", {}), dict):
        why = '"posterior" is not an object'
    if why is not None:
        raise ValueError(f"{meta} is damaged ({why}); it records the settings of {out}, which cannot be resumed without "
                         f"it: restore it, or {_afresh(out)}")  # fmt: skip
    if obj.get("version") != META_VERSION:
        raise ValueError(f"{meta} is format {obj.get('version')!r}, not {META_VERSION}: it was written by an older posterior, "
                         f"which did not record the posterior itself, so resuming {out} could mix two posteriors; {_afresh(out)}")  # fmt: skip
    return obj


def open_output(out: str | os.PathLike, settings: dict, num_prompts: int) -> set[int]:
    """Prepare ``out`` (a regular file) for appending and return the prompt indices it already holds.

    Checks ``out``'s settings file (writing it for a new job), truncates a torn last line, and
    raises ``ValueError`` when the file was made with other settings or is not a batch output."""
    out = Path(out)
    settings = _canonical(settings)
    meta = meta_path(out)
    data = out.read_bytes() if out.exists() else b""
    if data:
        diff = _differences(read_meta(out)["settings"], settings)
        if diff:
            raise ValueError(f"{str(out)!r} was written with other settings ({_said(diff)}); resume with the same settings, or {_afresh(out)}")
    else:
        _write_meta(meta, {"version": META_VERSION, "settings": settings})
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a torn last line: the process died inside its write
        with open(out, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
        print(f"posterior: dropped a torn last line ({len(data) - end} bytes) from {out}", file=sys.stderr)
    done: set[int] = set()
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        try:
            index = json.loads(line)["index"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{out}:{lineno} is not a batch output line (no JSON object with an index)") from None
        if not isinstance(index, int) or not 0 <= index < num_prompts or index in done:
            raise ValueError(f"{out}:{lineno}: index {index!r} is out of range or repeated")
        done.add(index)
    return done


def posterior_identity(post, prompts: Sequence[Prompt]) -> dict:
    """What the posterior is, by content (``posterior.fingerprints``, as training checkpoints
    record it): the prior's fingerprint (and a callable prior's code), the reward's name, values on
    the probe texts (bound to the first prompts when it reads them) and code, and beta."""
    from posterior.fingerprints import PROBE_PROMPTS, code_fingerprint, prior_fingerprint, reward_fingerprint
    from posterior.priors.callable import CallablePrior

    texts = [p if isinstance(p, str) else json.dumps(p, ensure_ascii=False, sort_keys=True) for p in list(prompts)[:PROBE_PROMPTS]]
    prior = prior_fingerprint(post.prior)
    if isinstance(post.prior, CallablePrior):
        prior["code"] = code_fingerprint(post.prior.next_logprobs)
    reward = {**reward_fingerprint(post.reward, post.prior, texts), "code": code_fingerprint(post.reward)}
    return _canonical({"prior": prior, "reward": reward, "beta": float(post.beta)})


def check_identity(out: str | os.PathLike, identity: dict, *, resumed: bool, allow_changes: Sequence[str] = ()) -> None:
    """Record the posterior's ``identity`` in ``out``'s settings file before its first line, or,
    resuming (``resumed``: ``out`` holds lines), refuse an identity that differs from the recorded
    one, naming each field, unless the field is in ``allow_changes`` (see :data:`IDENTITY_FIELDS`)."""
    out, meta = Path(out), meta_path(out)
    obj = read_meta(out)
    identity = _canonical(identity)
    if not resumed:
        obj["posterior"] = identity
        _write_meta(meta, obj)
        return
    if "posterior" not in obj:
        raise ValueError(f"{meta} does not record the posterior {out} was written with, so resuming it could mix two "
                         f"posteriors; {_afresh(out)}")  # fmt: skip
    allowed = lambda k: k in allow_changes or k.split(".")[0] in allow_changes  # noqa: E731
    diff = [(f"posterior.{k}", a, b) for k, a, b in _differences(obj["posterior"], identity) if not allowed(k)]
    if diff:
        fields = [k.removeprefix("posterior.") for k, _, _ in diff]
        hint = ""
        if all(f in IDENTITY_FIELDS for f in fields):
            hint = (f"; if the change is expected (a random reward, another Python version), accept it with "
                    f"allow_changes={tuple(fields)!r} (posterior batch: {' '.join('--allow-change ' + f for f in fields)})")  # fmt: skip
        raise ValueError(f"{out} was written with another posterior ({_said(diff)}); resume with the same posterior, "
                         f"or {_afresh(out)}{hint}")  # fmt: skip


def _write_meta(meta: Path, obj: dict) -> None:
    try:
        _write_atomic(meta, json.dumps(obj, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        err = WriteError(f"cannot write the settings file {meta}: {e.strerror or e}")
        err.errno = e.errno
        raise err from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LineWriter:
    """Appends whole lines: one ``write`` + ``fsync`` each, so a kill tears at most the last one;
    a failed write (ENOSPC) truncates its partial line away and raises :class:`WriteError`.
    ``stream=True`` (a device or pipe): no fsync, nothing to truncate."""

    def __init__(self, path: str | os.PathLike, *, stream: bool = False):
        self.path, self.stream, self.fd = path, stream, None
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | (0 if stream else os.O_CREAT), 0o644)
        except OSError as e:
            raise self._error(e, "cannot open") from None

    def _error(self, e: OSError, what: str) -> WriteError:
        err = WriteError(f"{what} {self.path}: {e.strerror or e}")
        err.errno = e.errno
        return err

    def write(self, line: str) -> None:
        data = line.encode("utf-8")
        end = None if self.stream else os.fstat(self.fd).st_size
        try:
            while data:  # a regular file takes it in one write; loop for the rare short write
                data = data[os.write(self.fd, data):]
            if not self.stream:
                os.fsync(self.fd)
        except OSError as e:
            if end is not None:
                try:
                    os.ftruncate(self.fd, end)  # needs no free space: the file keeps whole lines only
                except OSError:
                    pass  # the next run truncates the torn line
            raise self._error(e, "cannot write to") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
@dataclass
class BatchReport:
    out: str
    prompts: int  # in the input
    skipped: int  # already in ``out`` when the run started (a resume)
    written: int  # lines this run wrote
    seconds: float


def run(
    posterior,
    prompts: Sequence[Prompt] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    n: int = 16,
    method: str = "is",
    max_new_tokens: int = 32,
    seed: int = 0,
    options: dict | None = None,
    batch_size: int = 8,
    ray: bool = False,
    workers: int = 1,
    ray_address: str | None = None,
    settings: dict | None = None,
    format: str = "auto",
    progress: bool = True,
    allow_changes: Sequence[str] = (),
) -> BatchReport:
    """Sample every prompt and append one JSON line per prompt to ``out``; resumes a partial ``out``.

    Parameters
    ----------
    posterior : Posterior or callable
        The posterior, or a zero-argument callable that builds it (with ``ray=True`` each worker
        calls it once, so the prior is loaded once per worker; it must pickle, e.g. a module-level
        function or ``functools.partial``). A ``Posterior`` given with ``ray=True`` is shipped to
        the workers through Ray's object store. Either way the posterior's identity (module
        docstring) is recorded before the first line and checked on resume.
    prompts : list of prompts, or a path
        Texts, chat message lists, or objects ``{"prompt" | "messages": ..., "id": ...}``; a path
        is read with :func:`read_items` (``format``). An ``"id"`` is copied to the prompt's line.
    out : path
        The JSONL output; ``out + ".meta.json"`` records the settings and the posterior. An
        output that is not a regular file (``/dev/stdout``, a pipe) is streamed to, without resume.
    n, method, max_new_tokens, seed, options
        As ``Posterior.sample``; prompt ``i`` uses seed :func:`prompt_seed` ``(seed, i)``.
    batch_size : int
        Prompts per task handed to a Ray worker (and the write granularity of a Ray run). It does
        not change the output: every prompt is its own sampler call (see the module docstring).
    ray, workers, ray_address
        Data parallel over ``workers`` Ray actors, each holding one posterior. Without
        ``ray_address`` a local Ray is started with ``num_cpus=workers`` (unless Ray is already
        initialised in this process); with it, the job joins that cluster. Same output as without.
    settings : dict, optional
        Extra settings to record and check on resume (the CLI records its model options and a
        fingerprint of the model folder's files).
    progress : bool
        A progress bar with ETA on stderr.
    allow_changes : sequence of str
        Fields of the posterior's identity a resume may find changed (:data:`IDENTITY_FIELDS`,
        e.g. ``("reward.fingerprint",)`` for a random reward); the error of a refused resume names them.

    Returns
    -------
    BatchReport

    Raises
    ------
    ValueError
        Bad arguments, or a resume whose settings or posterior differ (naming each difference).
    WriteError
        Writing ``out`` failed (a full disk): the lines in it are whole, and the same call resumes.
    """
    import time

    from posterior.samplers.registry import sampler_options
    from posterior.validate import check_int, check_seed

    # --- everything checked before a model (or, given a callable, torch) loads ---
    n = check_int("n", n, 1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    workers = check_int("workers", workers, 1)
    seed = check_seed("seed", seed, or_none=True)
    known = sampler_options(method)  # an unknown method raises
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"method {method!r} has no option(s) {unknown}; its options are {sorted(known)}")
    if workers > 1 and not ray:
        raise ValueError(f"workers={workers} needs ray=True (workers are Ray actors)")
    if ray_address is not None and not ray:
        raise ValueError(f"ray_address={ray_address!r} needs ray=True")
    allow_changes = (allow_changes,) if isinstance(allow_changes, str) else tuple(allow_changes)
    bad = [f for f in allow_changes if f not in IDENTITY_FIELDS]
    if bad:
        raise ValueError(f"allow_changes names unknown field(s) {bad}; choose from {list(IDENTITY_FIELDS)}")
    is_post = not callable(posterior)  # a Posterior is not callable; a builder is
    if is_post:
        from posterior.posterior import Posterior

        if not isinstance(posterior, Posterior):
            raise ValueError(f"posterior must be a Posterior or a callable that builds one, got {type(posterior).__name__}")
    if isinstance(prompts, (str, os.PathLike)):
        items = read_items(prompts, format)
    else:
        items = [check_item(p, f"prompt #{i}") for i, p in enumerate(prompts)]
        if not items:
            raise ValueError("prompts is empty")
    prompts = [p for p, _ in items]
    fields = [f for _, f in items]
    stream = is_stream(out)
    parent = os.path.dirname(os.path.abspath(out))
    if not stream and not os.path.isdir(parent):
        raise ValueError(f"out {str(out)!r}: folder {parent!r} does not exist")
    spec = JobSpec(n=n, method=method, max_new_tokens=max_new_tokens, seed=seed, options=options)
    recorded = {**asdict(spec), "prompts_sha256": prompts_digest(prompts, fields), "num_prompts": len(prompts)}
    recorded.update(settings or {})

    t0 = time.perf_counter()
    if stream:  # a device or pipe: nothing to read back, nothing to resume
        done: set[int] = set()
        print(f"posterior: {out} is not a regular file: streaming to it (no resume, no {META_SUFFIX})", file=sys.stderr)
    else:
        done = open_output(out, recorded, len(prompts))
    todo = [(i, prompts[i], fields[i]) for i in range(len(prompts)) if i not in done]

    def check(identity: dict) -> None:  # before a line is written: a new job records it
        if not stream:
            check_identity(out, identity, resumed=bool(done), allow_changes=allow_changes)

    def check_workers(identities: list[dict]) -> None:  # Ray: one identity per actor
        for k, other in enumerate(identities[1:], 1):
            diff = _differences(identities[0], other)
            if diff:
                raise ValueError(f"Ray worker {k} built another posterior than worker 0 ({_said(diff)}); the builder must "
                                 "build the same posterior in every process (no unseeded randomness)")  # fmt: skip
        check(identities[0])

    # Built here unless Ray workers build it (they send their identities to ``check_workers``);
    # before the bar, so that its ETA is sampling's.
    post = posterior if is_post else (posterior() if todo and not ray else None)
    if post is not None:
        check(posterior_identity(post, prompts))
    bar = _progress_bar(len(prompts), len(done), progress)
    written = 0
    try:
        with LineWriter(out, stream=stream) as writer:
            def emit(line: str) -> None:
                nonlocal written
                writer.write(line)
                written += 1
                bar.update(1)

            if ray and todo:
                from posterior.batch.ray_workers import run_ray

                run_ray(posterior, todo, spec, emit, line=sample_line, identity=posterior_identity, workers=workers,
                        batch_size=batch_size, address=ray_address, check=None if is_post else check_workers,
                        probe_prompts=prompts)  # fmt: skip
            else:
                for i, prompt, extra in todo:
                    emit(sample_line(post, i, prompt, spec, extra))
    except WriteError as e:
        how = ("every line in it is whole: run the same job again to resume once there is room" if not stream
               else f"{out} is not a regular file, so nothing resumes: write to a file to resume")  # fmt: skip
        err = WriteError(f"{e} after {written} new line(s) ({len(done) + written} of {len(prompts)} in all); {how}")
        err.errno = e.errno
        raise err from None
    finally:
        bar.close()
    return BatchReport(out=str(out), prompts=len(prompts), skipped=len(done), written=written,
                       seconds=time.perf_counter() - t0)  # fmt: skip


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="batch", unit="prompt", file=sys.stderr, disable=not enabled,
                mininterval=1.0, smoothing=0.1)  # fmt: skip


__all__ = ["BatchReport", "JobSpec", "LineWriter", "WriteError", "check_identity", "is_stream", "open_output", "posterior_identity",
           "prompt_seed", "read_items", "read_prompts", "run", "sample_line"]
