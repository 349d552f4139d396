"""Errors raised for bad input, and the device / model checks that raise them.

Every error is a ``ValueError`` (or subclass) that names the bad value. The argument checks
(numbers, probabilities, seeds, choices) live in :mod:`posterior.validate`; their old names are
re-exported here.
"""

from __future__ import annotations

from posterior.validate import as_plain, check_int, check_real, is_int, is_real  # noqa: F401 (re-exported)


class DegenerateWeightsError(ValueError):
    """Every particle of some prompt has log-weight -inf (or the weights are otherwise unusable).

    Raised instead of letting NaN travel: a posterior with no finite-weight sample cannot be
    estimated from these draws. ``rows`` lists the offending prompt indices.
    """

    def __init__(self, message: str, rows: list[int] | None = None):
        super().__init__(message)
        self.rows = list(rows or [])


class CheckpointError(ValueError):
    """Saved training state that cannot be used: a missing, empty, truncated, garbage or foreign
    checkpoint or policy file, or a path of the wrong kind. The message is one line naming the
    path and what is wrong (the CLI prints it and exits 2); ``path`` is that path."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path


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


__all__ = ["CheckpointError", "DegenerateWeightsError", "bidirectional_encoder", "as_plain", "check_device", "check_hf_model", "check_int", "check_real", "is_int", "is_real"]
