"""The one set of argument checks for the whole package: each returns the value as a plain Python
type or raises ``ValueError`` naming the argument and the bad value.

What counts as a number is decided here once: Python ints and floats, numpy scalars (``np.int64``,
``np.float32``, ...) and one-element torch tensors of an integer / floating dtype. ``bool`` (and
``np.bool_``) is never a number (``n=True`` is a mistake, not 1). So ``fit``, ``Posterior.sample``,
``compare``, the samplers and the rewards accept and refuse the same values.

Every validator of the package lives here, and only here (:mod:`posterior.errors` holds the error
classes): numbers, seeds and choices; prompts (:func:`check_prompts`); devices and transformers
models (:func:`check_device`, :func:`check_hf_model`); tensors loaded from a file
(:func:`check_finite`). None of them imports torch before it is called.

Output paths too (:func:`check_output_file`, :func:`check_output_folder`): every command that writes
a file checks where before any work, asking the file system (a probe file created and removed), so
a run never ends with "not saved".
"""

from __future__ import annotations

import math
import numbers
import os
import stat
import sys
import tempfile
from collections.abc import Iterable

from posterior.errors import CheckpointError

#: The largest float32 (``torch.finfo(torch.float32).max``), as a constant: no torch needed.
FLOAT32_MAX = 3.4028234663852886e38
#: Seeds are what ``torch.Generator.manual_seed`` takes without wrapping: 0 .. 2**64 - 1.
SEED_MAX = 2**64 - 1


def _unwrap(value):
    """A one-element torch tensor as its Python scalar; anything else unchanged. (Without torch
    imported no value is a tensor: the command line's checks run before torch loads.)"""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        if value.dtype == torch.bool:
            return bool(value.item())
        return value.item()
    return value


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def is_int(value) -> bool:
    """An integer that is not a bool (numpy and one-element torch integers included)."""
    value = _unwrap(value)
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def is_real(value) -> bool:
    """A real number that is not a bool (numpy and one-element torch numbers included)."""
    value = _unwrap(value)
    return isinstance(value, numbers.Real) and not _is_bool(value)


def check_int(name: str, value, minimum: int | None = None, *, maximum: int | None = None) -> int:
    """``value`` as a Python int in [minimum, maximum], or ``ValueError`` naming ``name`` and the value."""
    what = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
    if maximum is not None:
        what += f" <= {maximum}"
    if not is_int(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    out = int(_unwrap(value))
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return out


def check_optional_int(name: str, value, minimum: int | None = None) -> int | None:
    """None, or ``check_int(name, value, minimum)``."""
    return None if value is None else check_int(name, value, minimum)


def check_seed(name: str, value, *, or_none: bool = False) -> int | None:
    """A seed: an int in [0, 2**64) (what ``torch.Generator.manual_seed`` takes); with
    ``or_none``, None too (fresh entropy)."""
    if or_none and value is None:
        return None
    if not is_int(value) or not 0 <= int(_unwrap(value)) <= SEED_MAX:
        raise ValueError(f"{name} must be an int in [0, 2**64){' or None (fresh entropy)' if or_none else ''}, got {value!r}")
    return int(_unwrap(value))


def check_real(
    name: str, value, *, positive: bool = False, finite: bool = True, minimum: float | None = None,
    maximum: float | None = None,
) -> float:  # fmt: skip
    """``value`` as a Python float, or ``ValueError`` naming ``name`` and the value.

    ``positive``: > 0; ``minimum`` / ``maximum``: inclusive bounds; ``finite``: no ±inf (NaN never)."""
    ok = is_real(value)
    out = float(_unwrap(value)) if ok else math.nan
    bad = not ok or math.isnan(out) or (finite and not math.isfinite(out)) or (positive and out <= 0)
    bad = bad or (minimum is not None and out < minimum) or (maximum is not None and out > maximum)
    if bad:
        kind = "a finite number" if finite else "a number"
        if minimum is not None and maximum is not None:
            bounds = f" in [{minimum:g}, {maximum:g}]"
        else:
            bounds = " > 0" if positive else ""
            bounds += f" >= {minimum:g}" if minimum is not None else f" <= {maximum:g}" if maximum is not None else ""
        raise ValueError(f"{name} must be {kind}{bounds}, got {value!r}")
    return out


def check_prob(name: str, value, *, open_low: bool = False) -> float:
    """A probability: a number in [0, 1] (in (0, 1] with ``open_low``)."""
    out = check_real(name, value, minimum=0.0, maximum=1.0)
    if open_low and out == 0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return out


def check_bool(name: str, value) -> bool:
    """A bool (numpy / one-element torch bools included); 0 and 1 are not bools here."""
    v = _unwrap(value)
    if not _is_bool(v):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(v)


def check_choice(name: str, value, choices: Iterable):
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    choices = list(choices)
    try:
        ok = value in choices
    except TypeError:  # unhashable / incomparable values
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_sampling(temperature, top_k, top_p) -> tuple[float, int | None, float | None]:
    """The prior's sampling modifications (temperature > 0, top-k, top-p), checked; returned as
    Python numbers (numpy / torch scalars accepted)."""
    if not (is_real(temperature) and math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if 1.0 / float(temperature) > FLOAT32_MAX:  # logits / temperature would be inf
        raise ValueError(f"temperature={temperature!r} is too small: 1/temperature overflows float32")
    if top_k is not None and (not is_int(top_k) or int(top_k) < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not (is_real(top_p) and 0 < float(top_p) <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    return float(temperature), None if top_k is None else int(top_k), None if top_p is None else float(top_p)


# --------------------------------------------------------------------------------------------------
# Output paths: checked before any work, so a run never ends with "could not save"
# --------------------------------------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    here = os.path.abspath(path)
    while not os.path.lexists(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    return here


def _probe_folder(name: str, path: str, folder: str) -> None:
    """Create and remove an empty file in ``folder``: what a write there needs (permissions, a
    read-only file system, a pseudo file system such as /proc), asked of the system itself."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".posterior-write-check-", dir=folder)
    except OSError as e:
        where = "it takes" if os.path.abspath(path) == folder else f"folder {folder!r} takes"
        raise ValueError(f"{name} {path!r} cannot be written: {where} no new files ({e.strerror or type(e).__name__})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(name: str, path) -> str:
    """``path`` as a str, if a file can be written there: a regular file or a new name (not a
    folder, device, pipe or socket), in an existing folder where new files can be created, and
    writable if it exists. Else ``ValueError`` naming ``name`` (e.g. ``"--plot"``) and the path.

    Called before any work (a model load, a sweep), so a run cannot end with its result unsaved.
    A full disk is not detected (nothing is written to test it)."""
    if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)):
        raise ValueError(f"{name} must be a file path, got {path!r}")
    path = str(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a folder; give a file name inside it")
    if os.path.lexists(path):
        try:
            mode = os.stat(path).st_mode
        except OSError as e:  # a dangling link
            raise ValueError(f"{name} {path!r} cannot be written ({e.strerror or type(e).__name__})") from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"{name} {path!r} is not a regular file (a device, pipe or socket); give a file name")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{name} {path!r} exists and is not writable")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        nearest = _nearest_existing(parent)
        why = "does not exist" if os.path.isdir(nearest) else f"cannot exist: {nearest!r} is a file"
        raise ValueError(f"{name} {path!r}: folder {parent!r} {why}")
    _probe_folder(name, path, parent)
    return path


def check_output_folder(name: str, path) -> str:
    """``path`` as a str, if it is a folder, or can become one, where files can be written: it
    (or its nearest existing ancestor, where it will be created) is a folder that takes new
    files. Else ``ValueError`` naming ``name`` (e.g. ``"--out"``) and the path. Nothing is created."""
    if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)):
        raise ValueError(f"{name} must be a folder path, got {path!r}")
    path = str(os.fspath(path))
    here = _nearest_existing(path)
    if not os.path.isdir(here):
        what = "is a file" if here == os.path.abspath(path) else f"is inside {here!r}, which is a file"
        raise ValueError(f"{name} {path!r} {what}, not a folder")
    _probe_folder(name, path, here)
    return path


def check_prompts(prompts) -> list[str] | None:
    """Prompts as a list of non-empty strs, or None (one unconditional prompt); one str is one prompt."""
    if prompts is None:
        return None
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is an empty list; pass None for one unconditional prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt #{i} must be a str, got {type(p).__name__}: {p!r}")
        if not p:
            raise ValueError(f"prompt #{i} is the empty string; pass prompts=None for an unconditional sample")
    return prompts


def check_device(device):
    """``device`` as a ``torch.device`` that exists here, or ``ValueError`` naming it."""
    import torch

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({e})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not available: torch.cuda.is_available() is False")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not available on this machine")
    return dev


def bidirectional_encoder(config) -> str | None:
    """Why a transformers config is not a causal LM (None if it is one): encoder families (BERT,
    RoBERTa, ...) carry ``is_decoder=False``; AutoModelForCausalLM still loads them as an "LM head"
    that attends both ways and keeps no KV cache."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "is_encoder_decoder", False):
        return f"{getattr(text, 'model_type', type(text).__name__)!r} is an encoder-decoder model; use a decoder-only model"
    if getattr(text, "is_decoder", True) is False:
        kind = getattr(text, "model_type", type(text).__name__)
        return (
            f"{kind!r} is a bidirectional encoder (config.is_decoder=False), not a left-to-right language model; "
            "use a decoder-only model (GPT-2, Llama, SmolLM2, ...)"
        )
    return None


def check_hf_model(model, tokenizer) -> None:
    """``HFPrior(model, tokenizer)`` takes a loaded causal LM and its tokenizer, in that order."""
    import torch

    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config") and callable(getattr(model, "generate", None))):
        raise ValueError(
            "model must be a loaded transformers causal LM (e.g. AutoModelForCausalLM.from_pretrained(path)), "
            f"got {type(model).__name__}: {str(model)[:80]!r}; to load from a folder use HFPrior.from_pretrained(path)"
        )
    if not_causal := bidirectional_encoder(model.config):
        raise ValueError(f"model {type(model).__name__} is not a causal LM: {not_causal}")
    if not (callable(getattr(tokenizer, "decode", None)) and callable(getattr(tokenizer, "get_vocab", None))):
        raise ValueError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}: {str(tokenizer)[:80]!r}")


def check_finite(state: dict, what: str, path, *, allow_neg_inf: bool = False) -> None:
    """Every floating tensor of a loaded ``state`` is finite (or -inf, with ``allow_neg_inf``: a
    table entry that is never taken), else :class:`CheckpointError` naming the file or folder: a
    NaN weight would turn every result NaN far from its cause (a damaged file, or a run saved
    after it diverged)."""
    import torch

    for name, t in state.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        bad = torch.isnan(t) | torch.isposinf(t)
        if not allow_neg_inf:
            bad |= torch.isneginf(t)
        if bool(bad.any()):
            first = t.reshape(-1)[bad.reshape(-1)][0].item()
            raise CheckpointError(
                f"{what} {path} holds {int(bad.sum())} non-finite value(s) ({first}) in {name!r}: the file is damaged, "
                "or was saved after training diverged", path,
            )  # fmt: skip


def as_plain(value):
    """numpy / one-element torch scalars as Python int, float or bool; other values unchanged
    (so method options given as ``np.int64(8)`` reach every sampler as ``8``)."""
    v = _unwrap(value)
    if type(v).__name__ == "bool_":
        return bool(v)
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Integral) and not isinstance(v, int):
        return int(v)
    if isinstance(v, numbers.Real) and not isinstance(v, float) and not isinstance(v, int):
        return float(v)
    if v is not value and isinstance(v, (int, float)):  # a torch scalar unwrapped
        return v
    return value


__all__ = [
    "FLOAT32_MAX", "SEED_MAX", "as_plain", "bidirectional_encoder", "check_bool", "check_choice", "check_device",
    "check_finite", "check_hf_model", "check_int", "check_optional_int", "check_output_file", "check_output_folder",
    "check_prob", "check_prompts", "check_real", "check_sampling", "check_seed", "is_int", "is_real",
]  # fmt: skip
