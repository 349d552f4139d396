"""Models load from local files only: a name that is not on disk fails at once, and no load reaches
the network.

``from_pretrained("gpt2", local_files_only=True)`` is not enough on its own: transformers first
asks huggingface_hub to resolve the name, and huggingface_hub 2.x builds its request headers by
fetching a registry from the Hub (``utils/_detect_agent.py``) before it looks at the cache; where
DNS answers slowly that costs tens of seconds per call, only to fail. So every loader here

* checks the path first (:func:`local_model_path`): a value that is not an existing folder (or
  file, where a file is what is loaded) fails with a ``ValueError`` naming it, before transformers
  is called; and
* loads inside :func:`offline`, which switches on huggingface_hub's offline mode (the
  ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` switches transformers and huggingface_hub honour) for
  the duration of the load and restores it after, besides passing ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

#: What a hub-style name gets told: posterior never downloads.
HUB_HINT = (
    "posterior loads models from local files only and never downloads (a hub name such as 'gpt2' is not "
    "fetched: download it first, e.g. `hf download NAME --local-dir DIR`, and pass DIR)"
)
_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

_lock = threading.Lock()
_depth = 0  # loads inside offline() now, over all threads: the switches are restored when it is 0
_saved: dict = {}


def local_model_path(value, *, what: str, file_ok: bool = False) -> Path:
    """``value`` (a str or os.PathLike) as an existing local folder, or file where ``file_ok``.

    Raises ``ValueError`` naming ``value`` and ``what`` (e.g. "a causal LM") when it is not a path, does
    not exist (a hub name), or is a file where a folder is needed; nothing touches the network.
    """
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"cannot load {what} from {value!r}: expected a folder on disk (a str or path)")
    path = Path(value).expanduser()
    if path.is_dir() or (file_ok and path.is_file()):
        return path
    if path.exists():
        raise ValueError(f"cannot load {what} from {os.fspath(value)!r} (local files only): it is a file, not a model folder")
    raise ValueError(f"cannot load {what} from {os.fspath(value)!r} (local files only): no such folder on this machine; {HUB_HINT}")


def _hub_constants():
    try:
        from huggingface_hub import constants
    except ModuleNotFoundError:  # no huggingface_hub: nothing could reach the Hub
        return None
    return constants


@contextlib.contextmanager
def offline():
    """Hugging Face offline mode while the block runs, restored after.

    Sets the environment variables ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` (read by code
    that imports huggingface_hub later, and by engine worker processes started inside the block) and
    ``huggingface_hub.constants.HF_HUB_OFFLINE`` (read by ``huggingface_hub.is_offline_mode()``, which
    transformers and huggingface_hub consult on every request: huggingface_hub reads the variable
    only at import, so setting the variable alone would not reach an imported library). Blocks
    may nest and run in several threads at once: the first to enter saves the user's settings, the
    last to leave restores them.
    """
    global _depth
    with _lock:
        if _depth == 0:
            constants = _hub_constants()
            _saved.clear()
            _saved["env"] = {k: os.environ.get(k) for k in _ENV}
            _saved["constants"] = constants, getattr(constants, "HF_HUB_OFFLINE", None)
            for k in _ENV:
                os.environ[k] = "1"
            if constants is not None:
                constants.HF_HUB_OFFLINE = True
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for k, v in _saved["env"].items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                constants, value = _saved["constants"]
                if constants is not None:
                    constants.HF_HUB_OFFLINE = value
                _saved.clear()


__all__ = ["HUB_HINT", "local_model_path", "offline"]
