"""A transformers sequence classifier as the reward: r(x) = log p(label | x) or its logit.

With ``output="log_prob"``, pi*(x) ∝ pi0(x) p(label | x)^(1/beta): at beta = 1 this is the
Bayesian posterior of the prior given the classifier's evidence (Korbak et al. 2022). The
classifier runs on its own device in batches; only local files are read.
"""

from __future__ import annotations

import os

import torch

from posterior.offline import local_model_path, offline
from posterior.rewards.base import Reward
from posterior.rewards.encoding import encoded_batches
from posterior.validate import check_int

OUTPUTS = ("log_prob", "logit")


def _head_prefixes(model) -> tuple[str, ...]:
    """Parameter-name prefixes of the classification head: every top-level module of the model but
    the base model (``classifier``, ``score``, ``pre_classifier``, ...)."""
    base = getattr(model, "base_model_prefix", None)
    return tuple(name for name, _ in model.named_children() if name != base)


class Classifier(Reward):
    """Score texts with a transformers sequence classifier (``AutoModelForSequenceClassification``).

    Parameters
    ----------
    model_or_path : str, os.PathLike or transformers model
        A folder on disk (local files only: any other value, a hub name included, fails at once
        naming it; see :mod:`posterior.offline`) or a loaded model.
    label : str or int
        The class whose score is the reward: a name from ``config.id2label`` or an index.
    output : "log_prob" | "logit"
        "log_prob": log softmax of the logits at ``label`` (log sigmoid for a one-logit model),
        <= 0. "logit": the raw logit.
    tokenizer : optional
        Needed when ``model_or_path`` is a model; loaded from the folder otherwise.
    batch_size : int
        Texts per forward pass.
    device : optional
        Where to run the classifier (default: where the model is; cpu when loaded from disk).
    max_length : int, optional
        Tokens per text; longer texts are scored on their first ``max_length`` tokens (stated, not
        silent: the default is the model's own limit, so only texts it cannot read are cut).
    accepts_prefixes : bool
        Declare the classifier meaningful on partial texts (SMC then uses it as a twist).
    """

    def __init__(self, model_or_path, *, label, output: str = "log_prob", tokenizer=None, batch_size: int = 32,
                 device=None, max_length: int | None = None, accepts_prefixes: bool = False):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        batch_size = check_int("batch_size", batch_size, 1)
        if isinstance(model_or_path, (str, os.PathLike)):
            path = os.fspath(model_or_path)
            local_model_path(path, what="a sequence classifier")  # a hub name fails here, naming it
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            try:
                with offline():
                    model, info = AutoModelForSequenceClassification.from_pretrained(
                        path, local_files_only=True, output_loading_info=True
                    )
                    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load a sequence classifier from {path!r} (local files only): {e}") from e
            # A folder without a trained head (a causal LM, a bare encoder) still loads, with the head
            # initialised at random: its "scores" would be noise. transformers lists such weights as missing.
            head = _head_prefixes(model)
            missing = [k for k in info.get("missing_keys", []) if any(k == h or k.startswith(h + ".") for h in head)]
            if missing:
                shown = missing[:4]
                raise ValueError(
                    f"{path!r} is not a sequence classifier checkpoint: its classification head {shown} is not in the "
                    "folder, so it would be initialised at random; use a folder saved from "
                    "AutoModelForSequenceClassification (a fine-tuned classifier)"
                )
            self._source = path
        else:
            model = model_or_path
            if tokenizer is None:
                raise ValueError("Classifier of a loaded model needs tokenizer=")
            self._source = getattr(model.config, "name_or_path", None) or type(model).__name__
        if device is not None:
            model = model.to(device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.output, self.batch_size, self.accepts_prefixes = output, batch_size, bool(accepts_prefixes)
        self.label_index = self._resolve_label(label)
        self.label = model.config.id2label.get(self.label_index, str(self.label_index))
        if max_length is None:
            limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
            limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
            max_length = min(limits) if limits else None
        self.max_length = max_length
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                "the classifier's tokenizer has no pad token, so texts cannot be batched; set tokenizer.pad_token "
                "(e.g. to tokenizer.eos_token) and model.config.pad_token_id"
            )

    def _resolve_label(self, label) -> int:
        cfg = self.model.config
        num = int(cfg.num_labels)
        names = {str(v): int(k) for k, v in cfg.id2label.items()}
        if isinstance(label, bool):
            raise ValueError(f"label must be a class name or index, got {label!r}")
        if isinstance(label, int):
            if not 0 <= label < num:
                raise ValueError(f"label index {label} is out of range for a classifier with {num} labels {sorted(names, key=names.get)}")
            return label
        if isinstance(label, str):
            if label in names:
                return names[label]
            if label.isdigit() and int(label) < num:  # "1" from a command line
                return int(label)
            raise ValueError(f"label {label!r} is not one of the classifier's labels {sorted(names, key=names.get)}")
        raise ValueError(f"label must be a class name or index, got {type(label).__name__}: {label!r}")

    def __repr__(self):
        return f"Classifier({self._source!r}, label={self.label!r}, output={self.output!r})"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def logits(self, texts: list[str]) -> torch.Tensor:
        """Classifier logits of ``texts``: (len(texts), num_labels) float32 on the CPU."""
        out = []
        for enc in encoded_batches(self.tokenizer, texts, batch_size=self.batch_size, max_length=self.max_length,
                                   device=self.device, what="classifier"):
            with torch.inference_mode():
                out.append(self.model(**enc).logits.float().cpu())  # (b, C)
        return torch.cat(out)

    def score(self, texts):
        logits = self.logits(texts).double()  # (B, C)
        if self.output == "logit":
            return logits[:, self.label_index]
        if logits.shape[-1] == 1:  # one logit: a binary classifier, p(label) = sigmoid(logit)
            return torch.nn.functional.logsigmoid(logits[:, 0])
        return torch.log_softmax(logits, dim=-1)[:, self.label_index]
