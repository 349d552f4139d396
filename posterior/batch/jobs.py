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
written, and samples the rest. ``OUT.meta.json`` records the settings (and a hash of the prompts);
a restart with different settings is refused, naming them.

Line shape (strict JSON: a non-finite number is null, its value under "nonfinite")::

    {"index": 0, "prompt": "The movie was", "seed": 3728..., "method": "smc",
     "samples": [{"text": ..., "log_weight": ..., "reward": ...}, ...],
     "log_Z": ..., "ess": ..., "kl": ..., "reward_mean": ..., "targets_posterior": true, "info": {...}}
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, Union

MASK64 = (1 << 64) - 1
META_SUFFIX = ".meta.json"
META_VERSION = 1
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
    """Prompts from a file: JSONL (``{"prompt": TEXT}`` or ``{"messages": [...]}`` per line) or
    plain text (one prompt per line). ``format`` "auto" takes JSONL for a ``.jsonl``/``.ndjson``
    name and text otherwise. Blank lines are skipped; prompt indices count the prompts, from 0."""
    path = Path(path)
    if format not in ("auto", "jsonl", "text"):
        raise ValueError(f"format must be 'auto', 'jsonl' or 'text', got {format!r}")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    if format == "auto":
        format = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text"
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            prompts.append(_jsonl_prompt(line, path, lineno) if format == "jsonl" else line)
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts")
    return prompts


def _jsonl_prompt(line: str, path: Path, lineno: int) -> Prompt:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
    if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
        raise ValueError(f'{where}: each line must be an object with one of "prompt" or "messages"')
    return check_prompt(obj["prompt"] if "prompt" in obj else obj["messages"], where)


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


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False, sort_keys=True).encode()).hexdigest()


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


def sample_line(post, index: int, prompt: Prompt, spec: JobSpec) -> str:
    """Sample prompt ``index`` with its derived seed and return its output line (ending in "\\n")."""
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
        "index": index, "prompt": prompt, "seed": seed, "method": res.method, "samples": samples,
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
def meta_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + META_SUFFIX)


def _canonical(settings: dict) -> dict:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: was {a!r}, now {b!r}")
    return out


def open_output(out: str | os.PathLike, settings: dict, num_prompts: int) -> set[int]:
    """Prepare ``out`` for appending and return the prompt indices it already holds.

    Checks ``out``'s settings file (writing it for a new job), truncates a torn last line, and
    raises ``ValueError`` when the file was made with other settings or is not a batch output."""
    out = Path(out)
    settings = _canonical(settings)
    meta = meta_path(out)
    data = out.read_bytes() if out.exists() else b""
    if data:
        if not meta.exists():
            raise ValueError(
                f"{str(out)!r} exists but {str(meta)!r} does not, so its settings cannot be checked; "
                "move it away or choose another output"
            )
        old = json.loads(meta.read_text(encoding="utf-8"))
        diff = _differences(old.get("settings", {}), settings)
        if diff:
            raise ValueError(
                f"{str(out)!r} was written with other settings ({'; '.join(diff)}); resume with the same "
                "settings, or choose another output"
            )
    else:
        _write_atomic(meta, json.dumps({"version": META_VERSION, "settings": settings}, indent=1, sort_keys=True) + "\n")
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LineWriter:
    """Appends whole lines: one ``write`` + ``fsync`` each, so a kill tears at most the last one."""

    def __init__(self, path: str | os.PathLike):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: str) -> None:
        data = line.encode("utf-8")
        while data:  # a regular file takes it in one write; loop for the rare short write
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

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
) -> BatchReport:
    """Sample every prompt and append one JSON line per prompt to ``out``; resumes a partial ``out``.

    Parameters
    ----------
    posterior : Posterior or callable
        The posterior, or a zero-argument callable that builds it (with ``ray=True`` each worker
        calls it once, so the prior is loaded once per worker; it must pickle, e.g. a module-level
        function or ``functools.partial``). A ``Posterior`` given with ``ray=True`` is shipped to
        the workers through Ray's object store.
    prompts : list of prompts, or a path
        Texts or chat message lists; a path is read with :func:`read_prompts` (``format``).
    out : path
        The JSONL output; ``out + ".meta.json"`` records the settings.
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
        Extra settings to record and check on resume (the CLI records model, reward, beta, ...).
        Given a ``Posterior``, its prior's description, reward name and beta are recorded too.
    progress : bool
        A progress bar with ETA on stderr.

    Returns
    -------
    BatchReport
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
    is_post = not callable(posterior)  # a Posterior is not callable; a builder is
    if is_post:
        from posterior.posterior import Posterior

        if not isinstance(posterior, Posterior):
            raise ValueError(f"posterior must be a Posterior or a callable that builds one, got {type(posterior).__name__}")
    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(prompts, format)
    else:
        prompts = [check_prompt(p, f"prompt #{i}") for i, p in enumerate(prompts)]
        if not prompts:
            raise ValueError("prompts is empty")
    spec = JobSpec(n=n, method=method, max_new_tokens=max_new_tokens, seed=seed, options=options)
    recorded = {**asdict(spec), "prompts_sha256": prompts_digest(prompts), "num_prompts": len(prompts)}
    if is_post:
        recorded["posterior"] = {"prior": posterior.prior.describe(), "reward": posterior.reward.name,
                                 "beta": posterior.beta}  # fmt: skip
    recorded.update(settings or {})

    t0 = time.perf_counter()
    done = open_output(out, recorded, len(prompts))
    todo = [(i, prompts[i]) for i in range(len(prompts)) if i not in done]
    post = posterior if is_post or ray or not todo else posterior()  # load before the bar: its ETA is sampling's
    bar = _progress_bar(len(prompts), len(done), progress)
    written = 0
    try:
        with LineWriter(out) as writer:
            def emit(line: str) -> None:
                nonlocal written
                writer.write(line)
                written += 1
                bar.update(1)

            if ray and todo:
                from posterior.batch.ray_workers import run_ray

                run_ray(posterior, todo, spec, emit, workers=workers, batch_size=batch_size, address=ray_address)
            else:
                for i, prompt in todo:
                    emit(sample_line(post, i, prompt, spec))
    finally:
        bar.close()
    return BatchReport(out=str(out), prompts=len(prompts), skipped=len(done), written=written,
                       seconds=time.perf_counter() - t0)  # fmt: skip


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="batch", unit="prompt", file=sys.stderr, disable=not enabled,
                mininterval=1.0, smoothing=0.1)  # fmt: skip


__all__ = ["BatchReport", "JobSpec", "LineWriter", "open_output", "prompt_seed", "read_prompts", "run", "sample_line"]
