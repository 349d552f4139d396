"""How many CPU threads torch should use here: one per core that is actually free.

torch's default is one intra-op thread per core. On a shared machine that is the slow case: a
matrix product is split over every core, and the slice on a core another process holds waits for
it, so every product runs at the pace of the busiest core (the README's main command took 151 s
with torch's 2 threads against 24 s with one on a loaded 2-core machine). :func:`default_threads`
counts the cores this process may run on (``os.sched_getaffinity``) minus the load already on
them (the 1-minute load average), at least 1:

    threads = max(1, min(cores, round(cores - load)))

The command line applies it (``torch.set_num_threads``) unless ``--threads N``,
``POSTERIOR_THREADS`` or ``OMP_NUM_THREADS`` says otherwise. The library never changes torch's
global thread count by itself; a script that wants the same choice calls

    torch.set_num_threads(posterior.threads.default_threads())

before it loads a model.
"""

from __future__ import annotations

import os

ENV = "POSTERIOR_THREADS"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """One thread per free core: ``max(1, min(cores, round(cores - load)))``.

    Parameters
    ----------
    cores : int or None
        Cores available (default :func:`available_cores`).
    load : float or None
        Runnable processes already on the machine (default: the 1-minute load average; 0 where
        the platform has none). On a machine with more cores than this process may use the load
        is shared by all of them, so it is scaled by ``cores / os.cpu_count()``.

    Returns
    -------
    int
        At least 1, at most ``cores``.
    """
    if cores is None:
        cores = available_cores()
    if load is None:
        try:
            load = os.getloadavg()[0] * cores / max(cores, os.cpu_count() or cores)
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, round(cores - load)))


def requested_threads(cli_value: int | None = None) -> tuple[int | None, str]:
    """The thread count the user asked for, and where it came from: ``--threads``, then
    ``POSTERIOR_THREADS``, then ``OMP_NUM_THREADS`` (torch already obeys that one: returned as
    None so nothing is changed). (None, "default") when nobody asked."""
    if cli_value is not None:
        return cli_value, "--threads"
    text = os.environ.get(ENV)
    if text:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{ENV} must be an int >= 1, got {text!r}")
        return value, ENV
    if os.environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    return None, "default"


__all__ = ["available_cores", "default_threads", "requested_threads"]
