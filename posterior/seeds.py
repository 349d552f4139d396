"""Secondary seeds derived from a user's seed without overflow.

A run seeded with ``seed`` (any int in [0, 2**64), what ``torch.Generator.manual_seed`` takes)
sometimes needs further independent streams: the CLI's prior comparison, the frontier draws of
``compare``, one stream per training rank. ``seed + 1`` overflows at 2**64 - 1 and makes stream k of
seed s equal stream 0 of seed s + k; instead each stream is SplitMix64 (Steele, Lea & Flood 2014,
"Fast splittable pseudorandom number generators") of the seed mixed with a hash of the stream's
name, truncated to [0, 2**63) so it is a valid seed for every consumer (numpy, torch, Python).
"""

from __future__ import annotations

import hashlib

_MASK = 2**64 - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(seed: int, stream: str | int) -> int:
    """A seed in [0, 2**63) for the named ``stream`` of a run seeded with ``seed``.

    Deterministic (the same seed and stream give the same value in every process: the stream's
    name is hashed with SHA-256, not Python's salted ``hash``), defined for every int ``seed``
    (taken modulo 2**64) and different streams give unrelated values.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    tag = int.from_bytes(hashlib.sha256(str(stream).encode()).digest()[:8], "little")
    return _splitmix64(_splitmix64(seed & _MASK) ^ tag) >> 1
