"""Gather concurrent requests into multi-prompt sampler calls, on one worker thread.

A request becomes a :class:`Job`: its settings (everything that defines the sampler call except
the prompts: reward spec, beta, method, options, n, max_tokens), its prompts and its seed. The
worker takes the oldest waiting job, waits until ``window_s`` has passed since it arrived (no wait
when it has already waited that long, e.g. behind a running call), and runs it together with every
waiting job of equal settings, up to ``max_batch_prompts`` prompts, as ONE call
``Posterior.sample(prompts=[...])``: the cost of a decoding step is shared by all their particles.

Seeds. Where the settings allow per-prompt streams (``per_prompt_seeds(settings)``: methods
registered with ``streams=True`` on priors with ``ROW_STREAMS``, see :mod:`posterior.streams`),
every call passes one seed per prompt: prompt i of a job seeded s gets :func:`prompt_seeds`
``(s, count)[i]``, and a job without a seed gets a fresh s. Prompt i's draws then come only from
its own stream, so a seeded job is batched like any other and its result is the same whatever it
is batched with; each job reports its own s (replayable alone:
``Posterior.sample(prompts, seed=prompt_seeds(s, len(prompts)))``).

Elsewhere ``Posterior.sample`` draws every prompt of a call from one generator, so a prompt's
draws depend on the other prompts of the call: a job with a seed then runs alone, and its result
is exactly ``Posterior.sample(prompts=its prompts, seed=seed, ...)``. Jobs without a seed are
batched; a call that serves one job reports its fresh seed, a call that serves several reports none.

Bounds. At most ``max_queue`` jobs wait (``submit`` raises :class:`QueueFull` beyond, the server
answers 429). A cancelled job (its client went away) is dropped if it has not started; a running
call whose jobs are all cancelled is aborted from the sampler's ``callback`` where the method has
one (SMC, MH), else it finishes and its result is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("posterior.serve")


class QueueFull(RuntimeError):
    """The bounded queue of waiting jobs is full."""


class Cancelled(Exception):
    """Raised inside a sampler's callback to abort a call whose clients are all gone."""


@dataclass(eq=False)
class Job:
    """One request: ``settings`` (hashable; equal settings may share a call), prompts, seed.

    Events go to ``events`` on the request's event loop: ("delta", {choice: text}) while an SMC
    run fixes text (streaming jobs only), then one ("done", Outcome) or ("error", status, message).
    """

    settings: Hashable
    prompts: list[str]
    seed: int | None
    stream: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    sent_deltas: bool = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> "Job":
        self.loop, self.events = loop, asyncio.Queue()
        return self

    def emit(self, *event) -> None:
        """Hand an event to the request's coroutine (thread-safe; dropped once cancelled or when
        the loop has closed)."""
        if self.cancelled.is_set() or self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(frozen=True)
class Outcome:
    """A job's share of one sampler call: prompts ``first .. first + len(job.prompts) - 1`` of
    ``result``; ``seed`` is the job's own seed with per-prompt seeds, else the call's seed if the
    call served this job alone, else None."""

    result: Any  # SampleResult
    first: int
    seed: int | None
    requests: int  # jobs served by the call
    prompts: int  # prompts in the call


def prompt_seeds(seed: int, count: int) -> list[int]:
    """The per-prompt seeds of a job seeded ``seed`` with ``count`` prompts (independent streams:
    :func:`posterior.seeds.derive_seed`)."""
    from posterior.seeds import derive_seed

    return [derive_seed(seed, f"prompt-{i}") for i in range(count)]


# run(settings, prompts, seed, callback) -> (result, seed used); callback(report) or None. ``seed``
# is one int (or None: fresh) for the whole call, or a list with one seed per prompt.
RunFn = Callable[[Hashable, list[str], "int | None", "Callable | None"], tuple[Any, "int | None"]]
# make_callback(jobs, offsets) -> a StepReport callback, or None if the method takes none
CallbackFactory = Callable[[list[Job], list[int]], "Callable | None"]


class Batcher:
    """The worker thread and its bounded queue (see the module docstring).

    Parameters
    ----------
    run : RunFn
        Runs one sampler call; raises to fail every job of the call.
    make_callback : CallbackFactory or None
        Builds the sampler callback of a call (streaming and cancellation), or None.
    error_status : callable
        Maps an exception to (HTTP status, message).
    window_s : float >= 0
        How long the oldest job waits for company.
    max_batch_prompts : int >= 1
        Most prompts in one call (1 and window 0: every job alone, the serial baseline).
    max_queue : int >= 1
        Most jobs waiting (not yet running).
    per_prompt_seeds : callable
        ``per_prompt_seeds(settings)``: whether calls of these settings take one seed per prompt
        (then seeded jobs are batched too; the module docstring).
    """

    def __init__(self, run: RunFn, *, make_callback: CallbackFactory | None = None, error_status=None,
                 window_s: float = 0.02, max_batch_prompts: int = 32, max_queue: int = 256,
                 per_prompt_seeds: Callable[[Hashable], bool] = lambda settings: False):  # fmt: skip
        if not (isinstance(window_s, (int, float)) and window_s >= 0):
            raise ValueError(f"window_s must be a number >= 0, got {window_s!r}")
        for name, v in (("max_batch_prompts", max_batch_prompts), ("max_queue", max_queue)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.run, self.make_callback, self.per_prompt_seeds = run, make_callback, per_prompt_seeds
        self.error_status = error_status or (lambda e: (500, f"{type(e).__name__}: {e}"))
        self.window_s, self.max_batch_prompts, self.max_queue = float(window_s), max_batch_prompts, max_queue
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.running = 0  # jobs in the call now running
        self.current: list[Job] = []  # those jobs
        self.calls = 0  # sampler calls made (for /health and tests)
        self.aborted = 0  # calls aborted because all their clients went away

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="posterior-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the waiting jobs, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            self._pending = [j for j in self._pending if not j.cancelled.is_set()]
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the queue holds {self.max_queue}); retry later")
            self._pending.append(job)
            self._cond.notify_all()

    # --- the worker --------------------------------------------------------------------------
    def _group(self, first: Job) -> list[Job]:
        """``first`` and the waiting jobs that may share its call (lock held)."""
        streams = self.per_prompt_seeds(first.settings)
        if first.seed is not None and not streams:
            return [first]
        group, count = [first], len(first.prompts)
        for j in self._pending:
            if j is first or (j.seed is not None and not streams) or j.settings != first.settings or j.cancelled.is_set():
                continue
            if count + len(j.prompts) > self.max_batch_prompts:
                break
            group.append(j)
            count += len(j.prompts)
        return group

    def _next(self) -> list[Job] | None:
        with self._cond:
            while True:
                self._pending = [j for j in self._pending if not j.cancelled.is_set()]
                if not self._pending:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                first = self._pending[0]
                left = first.arrived + self.window_s - time.monotonic()
                full = sum(len(j.prompts) for j in self._group(first)) >= self.max_batch_prompts
                alone = first.seed is not None and not self.per_prompt_seeds(first.settings)
                if left > 0 and not full and not self._stopping and not alone:
                    self._cond.wait(left)  # company may arrive; re-check everything after
                    continue
                group = self._group(first)
                ids = {id(j) for j in group}
                self._pending = [j for j in self._pending if id(j) not in ids]
                for j in group:
                    j.started = True
                self.running, self.current = len(group), group
                return group

    def _loop(self) -> None:
        while True:
            group = self._next()
            if group is None:
                return
            try:
                self._serve(group)
            except BaseException:  # never let the worker die: the server would hang
                log.exception("sampler worker")
            finally:
                self.running, self.current = 0, []

    def _serve(self, group: list[Job]) -> None:
        prompts, offsets = [], []
        for j in group:
            offsets.append(len(prompts))
            prompts.extend(j.prompts)
        callback = self.make_callback(group, offsets) if self.make_callback is not None else None
        job_seeds = None
        if self.per_prompt_seeds(group[0].settings):  # one stream per prompt: each job keeps its own seed
            job_seeds = [secrets.randbits(63) if j.seed is None else j.seed for j in group]
            seed = [s for j, js in zip(group, job_seeds) for s in prompt_seeds(js, len(j.prompts))]
        else:
            seed = group[0].seed
        self.calls += 1
        try:
            result, used = self.run(group[0].settings, prompts, seed, callback)
        except Cancelled:
            self.aborted += 1
            return
        except Exception as e:  # noqa: BLE001 - one failing call must not take the server down
            if len(group) > 1:
                # One job's prompt may have failed the call (e.g. all its particles died): serve
                # the others alone. A streaming job that already got text cannot restart.
                for j in group:
                    if j.sent_deltas:
                        j.emit("error", *self.error_status(e))
                    elif not j.cancelled.is_set():
                        self._serve([j])
                return
            log.info("request failed: %s: %s", type(e).__name__, e)
            group[0].emit("error", *self.error_status(e))
            return
        for k, (j, first) in enumerate(zip(group, offsets)):
            own = job_seeds[k] if job_seeds is not None else used if len(group) == 1 else None
            j.emit("done", Outcome(result, first, own, len(group), len(prompts)))


def abort_when_all_cancelled(jobs: list[Job]) -> None:
    """For a sampler callback: raise :class:`Cancelled` once every job of the call is cancelled."""
    if all(j.cancelled.is_set() for j in jobs):
        raise Cancelled()


__all__ = ["Batcher", "Cancelled", "Job", "Outcome", "QueueFull", "abort_when_all_cancelled", "prompt_seeds"]
