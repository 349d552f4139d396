"""Where converted weights are cached, and the digests that name and check them (used by the
default prior's dequantised copy and by LlamaCppPrior's float32 copies): ``$POSTERIOR_CACHE``, else
``~/.cache/posterior``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("POSTERIOR_CACHE", Path.home() / ".cache" / "posterior"))


SAMPLE_HEAD, SAMPLE_BLOCKS, SAMPLE_BLOCK = 1 << 20, 64, 1 << 16  # sampled digest: head + 64 blocks of 64 KiB


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sampled_digest(path: Path) -> str:
    """sha256 of the file's size, its first MiB and 64 evenly spaced 64 KiB blocks (the whole file
    when it is smaller than that): cheap, and it changes with any truncation or any other model."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_HEAD))
        if size > SAMPLE_HEAD:
            span = size - SAMPLE_HEAD
            for i in range(SAMPLE_BLOCKS):
                f.seek(SAMPLE_HEAD + span * i // SAMPLE_BLOCKS)
                h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()
