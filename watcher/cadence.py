"""When the daemon's periodic jobs run (the polls, housekeeping, the clock check), on the monotonic clock.

A wall clock stepped back an hour (an NTP step, a VM restored from a snapshot) must not hold a poll
for an hour, and one stepped forward must not fire a burst: every decision here reads
`Clock.monotonic()`, never the wall clock. (APScheduler 3 computes its run times on the wall
clock: under it, a step back of an hour stopped lead polling for that hour.)

A job runs at its start and then on every `interval` boundary after it, one run at a time, each run
in a task of its own. A run that lasts past the boundary skips the boundaries it covered (they are
coalesced into the next one) and says so in one line with how long it took.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import structlog

from watcher.clock import Clock

log = structlog.get_logger("watcher.cadence")

# The longest a job waits without looking at the clock again: a bound on how late a run can start
# if the loop's timer and the injected clock ever disagree.
MAX_WAIT = 5.0


def next_start(started: float, finished: float, interval: float) -> float:
    """The first boundary of a job's cadence after a run that started and finished at these times."""
    if interval <= 0:
        return finished
    due = started + interval
    if finished < due:
        return due
    return started + (math.floor((finished - started) / interval) + 1) * interval


def overrun(started: float, finished: float, interval: float) -> float:
    """Seconds a run lasted past its interval; 0.0 when it ended within it."""
    return max(0.0, (finished - started) - interval) if interval > 0 else 0.0


@dataclass
class _Job:
    name: str
    interval: float
    run: Callable[[], Awaitable[Any]]
    next_at: float
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    loop: asyncio.Task[None] | None = None
    removed: bool = False


class Cadence:
    """Runs named jobs on their intervals until `stop()`; `pause()` holds new runs (a reload's window)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._jobs: dict[str, _Job] = {}
        self._running = asyncio.Event()
        self._running.set()
        self._stopped = False

    def add(self, name: str, interval: float, run: Callable[[], Awaitable[Any]], *, at_once: bool = True) -> None:
        """Start running `run` every `interval` seconds: now, or one interval from now."""
        start = self.clock.monotonic() + (0.0 if at_once else interval)
        job = _Job(name, interval, run, start)
        self._jobs[name] = job
        job.loop = asyncio.create_task(self._loop(job), name=f"cadence {name}")

    def remove(self, name: str) -> None:
        """No further runs of `name`; a run under way finishes."""
        job = self._jobs.pop(name)
        job.removed = True
        job.changed.set()

    def reschedule(self, name: str, interval: float) -> None:
        """A new interval for `name`, counted from now."""
        job = self._jobs[name]
        job.interval = interval
        job.next_at = self.clock.monotonic() + interval
        job.changed.set()

    def names(self) -> set[str]:
        return set(self._jobs)

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        """No new runs; runs under way are the caller's to wait for or cancel."""
        self._stopped = True
        self._running.set()
        for job in self._jobs.values():
            job.changed.set()

    async def aclose(self) -> None:
        self.stop()
        loops = [job.loop for job in self._jobs.values() if job.loop is not None]
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    def _done(self, job: _Job) -> bool:
        return self._stopped or job.removed

    async def _loop(self, job: _Job) -> None:
        while True:
            await self._until_due(job)
            if self._done(job):
                return
            started = self.clock.monotonic()
            # A task of its own, as each run was under the old scheduler: the daemon tracks runs
            # (a stop waits for them, then cancels), and cancelling this loop leaves a run alone.
            run = asyncio.create_task(_call(job.run), name=f"run {job.name}")
            await asyncio.wait({run})
            if not run.cancelled() and run.exception() is not None:
                log.error("run failed", job=job.name, error=repr(run.exception())[:300])
            finished = self.clock.monotonic()
            late = overrun(started, finished, job.interval)
            if late > 0:
                log.warning(
                    "run overran its interval; the runs it covered are skipped, the next starts on the next beat",
                    job=job.name,
                    interval=job.interval,
                    took=round(finished - started, 1),
                    over_by=round(late, 1),
                )
            job.next_at = max(job.next_at, next_start(started, finished, job.interval))

    async def _until_due(self, job: _Job) -> None:
        while not self._done(job):
            if not self._running.is_set():
                await self._running.wait()
                continue
            wait = job.next_at - self.clock.monotonic()
            if wait <= 0:
                return
            job.changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(job.changed.wait(), timeout=min(wait, MAX_WAIT))


async def _call(run: Callable[[], Awaitable[Any]]) -> None:
    await run()
