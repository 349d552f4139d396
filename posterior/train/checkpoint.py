"""Checkpoint files of a training run: written atomically, found again after a kill.

Each process (rank) writes ``checkpoint-rank{r}-step{S:08d}.pt`` to a temporary file, flushes and
fsyncs it, and renames it into place with ``os.replace`` (atomic on POSIX), so a run killed at any
moment leaves either the previous checkpoint or the new one, never a torn file. The last
``KEEP`` checkpoints of each rank are kept; the run resumes from the latest step that every rank
has (ranks are at most one checkpoint apart, since they synchronise at every optimiser step).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

KEEP = 2
_NAME = re.compile(r"^checkpoint-rank(\d+)-step(\d{8})\.pt$")


def checkpoint_path(directory: Path, rank: int, step: int) -> Path:
    return Path(directory) / f"checkpoint-rank{rank}-step{step:08d}.pt"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(directory: Path, rank: int, step: int, payload: dict) -> Path:
    """Write one rank's checkpoint atomically and drop that rank's older ones beyond ``KEEP``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, rank, step)
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    for old in sorted(steps_of(directory).get(rank, []))[:-KEEP]:
        checkpoint_path(directory, rank, old).unlink(missing_ok=True)
    return path


def steps_of(directory: Path) -> dict[int, list[int]]:
    """Checkpointed steps per rank found in ``directory`` (temporary files ignored)."""
    out: dict[int, list[int]] = {}
    if not Path(directory).is_dir():
        return out
    for entry in Path(directory).iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    return out


def latest_step(directory: Path, world_size: int) -> int | None:
    """The latest step checkpointed by every rank 0..world_size-1, or None."""
    found = steps_of(directory)
    common = None
    for r in range(world_size):
        steps = set(found.get(r, []))
        common = steps if common is None else common & steps
    return max(common) if common else None


def load_checkpoint(directory: Path, rank: int, step: int) -> dict:
    return torch.load(checkpoint_path(directory, rank, step), map_location="cpu", weights_only=True)


def remove_temporaries(directory: Path, rank: int = 0) -> None:
    """Leftover temporary files of a killed run (never renamed into place): this rank's checkpoint
    files, and, on rank 0, the metrics file's (each rank removes only what it writes)."""
    own = (f".checkpoint-rank{rank}-",) + ((".metrics",) if rank == 0 else ())
    if Path(directory).is_dir():
        for entry in Path(directory).iterdir():
            if entry.name.startswith(own) and ".tmp" in entry.name:
                entry.unlink(missing_ok=True)


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Metric lines of steps <= ``up_to_step`` (a torn last line after a kill is dropped)."""
    out: list[dict] = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= up_to_step:
            out.append(row)
    return out


def rewrite_metrics(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    atomic_write_bytes(Path(path), lambda f: f.write(text))
