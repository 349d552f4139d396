"""Data parallel batch jobs over Ray actors, each holding one posterior (one loaded prior).

The driver cuts the prompts still to do into tasks of ``batch_size`` prompts, keeps at most two
tasks in flight per actor, and writes the returned lines in prompt order (results that arrive
early wait in a buffer; no task is sent more than a bounded window ahead of the next line to
write, so the buffer stays small). A worker computes each line exactly as a local run does
(with the ``line`` function the job passes in, :func:`posterior.batch.jobs.sample_line`), so the
output is the same bytes. The job hands this module what it needs (``line``, ``identity``,
``check``): nothing here imports the job, which imports this module.

Ray is imported only here, and only when ``--ray`` is asked for (an optional extra:
``pip install "posterior-align[ray]"``).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable

WINDOW_TASKS_PER_WORKER = 4  # tasks a worker may run ahead of the next line to write
THREADS_PER_WORKER = 1  # torch threads per actor: an actor is one CPU of data parallelism


def _ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError('--ray needs Ray: pip install "posterior-align[ray]" (ray>=2.9)') from e
    return ray


class _Worker:
    """A Ray actor: builds (or receives) the posterior once, then samples tasks of prompts."""

    def __init__(self, source, line, identity):
        import torch

        from posterior.posterior import Posterior

        torch.set_num_threads(THREADS_PER_WORKER)
        self.post = source if isinstance(source, Posterior) else source()
        self.line, self.identity_of = line, identity

    def pid(self) -> int:
        return os.getpid()

    def identity(self, prompts) -> dict:
        return self.identity_of(self.post, prompts)

    def run(self, jobs, spec) -> list[tuple[int, str]]:
        return [(i, self.line(self.post, i, prompt, spec, fields)) for i, prompt, fields in jobs]


def _get(ray, refs):
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise e.as_instanceof_cause() from None  # the worker's ValueError etc., not a wrapper


def start(address: str | None, workers: int) -> bool:
    """Initialise Ray unless it already is; returns whether this call started it (and so must shut
    it down). Locally: ``num_cpus=workers``, no dashboard."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


def run_ray(source, todo, spec, emit: Callable[[str], None], *, line: Callable[..., str], identity: Callable[..., dict],
            workers: int, batch_size: int, address: str | None = None,
            check: Callable[[list[dict]], None] | None = None, probe_prompts=None) -> None:  # fmt: skip
    """Sample ``todo`` ([(index, prompt, fields)], in prompt order) on ``workers`` actors; ``emit``
    gets each line in the order of ``todo``. ``source`` is a Posterior or a callable building one;
    an actor makes each line with ``line(post, index, prompt, spec, fields)``. With ``check``,
    every actor first reports the identity of the posterior it built (``identity(post,
    probe_prompts)``), and ``check`` gets the list of them, one per actor, before any task is sent
    (it raises where the actors built different posteriors)."""
    ray = _ray()
    from posterior.posterior import Posterior

    started = start(address, workers)
    actors = []
    try:
        handle = ray.put(source) if isinstance(source, Posterior) else source
        Worker = ray.remote(num_cpus=1)(_Worker)
        actors = [Worker.remote(handle, line, identity) for _ in range(workers)]
        if check is not None:
            check(_get(ray, [a.identity.remote(probe_prompts) for a in actors]))
        tasks = deque(todo[k : k + batch_size] for k in range(0, len(todo), batch_size))
        position = {i: pos for pos, (i, *_) in enumerate(todo)}
        window = WINDOW_TASKS_PER_WORKER * workers * batch_size
        next_pos, buffered = 0, {}
        in_flight: dict = {}  # ObjectRef -> actor
        load = {k: 0 for k in range(len(actors))}

        def submit() -> None:
            for k in sorted(load, key=load.get):
                if not tasks or load[k] >= 2 or position[tasks[0][0][0]] >= next_pos + window:
                    continue
                in_flight[actors[k].run.remote(tasks.popleft(), spec)] = k
                load[k] += 1

        submit()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            load[in_flight.pop(ref)] -= 1
            lines = _get(ray, ref)
            for i, line in lines:
                buffered[position[i]] = line
            while next_pos in buffered:
                emit(buffered.pop(next_pos))
                next_pos += 1
            submit()
        if next_pos != len(todo):  # cannot happen unless a task was lost
            raise RuntimeError(f"Ray batch ended with {len(todo) - next_pos} prompts unwritten")
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
