"""Checkpoint files of a training run: written atomically, found again after a kill.

Each process (rank) writes ``checkpoint-rank{r}-step{S:08d}.pt`` to a temporary file, flushes and
fsyncs it, and renames it into place with ``os.replace`` (atomic on POSIX), so a run killed at any
moment leaves either the previous checkpoint or the new one, never a torn file. The last
``KEEP`` checkpoints of each rank are kept; the run resumes from the latest step that every rank
has (ranks are at most one checkpoint apart, since they synchronise at every optimiser step).
A file damaged afterwards (truncated, emptied, overwritten, or not a checkpoint at all) raises
:class:`~posterior.errors.CheckpointError` naming it; the loop then falls back to the previous one.

Run identity. A checkpoint records what defines its run (``fit``'s config), so that resuming
into a directory of another run is refused instead of mixing both. The prior and reward enter
by name and a content fingerprint, cheap and deterministic: see :mod:`posterior.fingerprints`
(shared with batch jobs) for what they detect and what they cannot. A reward that is random (a
sampled judge) would differ on every call: pass ``allow_changes=("reward",)`` to resume such a run.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from posterior.errors import CheckpointError, first_line
from posterior.validate import check_finite  # noqa: F401 (its old name here)
# The run-identity fingerprints moved to posterior/fingerprints.py (shared with batch jobs); their
# old names here stay importable.
from posterior.fingerprints import (  # noqa: F401
    PROBE_PROMPTS, PROBE_TEXTS, PROBE_TOKENS, TENSOR_SAMPLE, _digest, prior_fingerprint, reward_fingerprint, reward_name,
    tensors_digest,
)  # fmt: skip

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


PAYLOAD_KEYS = ("format", "step", "config", "trainable", "optimizer", "generator", "log_Z", "count")


def load_file(path: Path, what: str = "checkpoint"):
    """``torch.load`` (tensors only, no code) of one file, or :class:`CheckpointError` naming it.

    A missing, empty, truncated or garbage file raises torch's OSError / EOFError / RuntimeError /
    UnpicklingError, whose text even suggests ``weights_only=False`` (loading code from a file a
    user did not write): none of that reaches the user."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist", path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file", path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)", path)
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # foreign objects (classes, code) the tensors-only loader refuses
        # (torch's own text suggests weights_only=False, i.e. running code from the file: not repeated)
        raise CheckpointError(f"{what} {path} is not a posterior {what}: it holds objects other than tensors and plain data", path) from None
    except (OSError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"{what} {path} is truncated or not a torch file ({type(e).__name__}: {first_line(e)})", path) from None


def load_checkpoint(directory: Path, rank: int, step: int) -> dict:
    """One rank's checkpoint payload, or :class:`CheckpointError` if the file is damaged or foreign."""
    path = checkpoint_path(directory, rank, step)
    state = load_file(path)
    if not isinstance(state, dict) or not all(k in state for k in PAYLOAD_KEYS) or not isinstance(state["config"], dict):
        have = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} is not a posterior training checkpoint (it holds {have})", path)
    return state


def check_directory(directory: Path) -> None:
    """``checkpoint_dir`` must be a folder (or not exist yet): a file there is an error, not a crash."""
    directory = Path(directory)
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"checkpoint_dir {directory} cannot be a folder: {parent} is a file", directory)
            return


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


def policy_fingerprint(policy) -> dict:
    """The policy's kind and the names and shapes of its trainable tensors (LoRA rank, table size)."""
    describe = getattr(policy, "describe", None)  # any trainable with these two methods (policies, twists)
    kind = (describe() if callable(describe) else {}).get("policy", type(policy).__name__)
    shapes = [tuple(p.shape) for p in policy.trainable_parameters()]  # shapes only: no copy of the weights
    return {"kind": kind, "trainable": _digest(shapes)}
