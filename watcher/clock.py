"""The one place that reads the wall clock or sleeps; everything else takes a `Clock`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Unix seconds."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for budgets and durations)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to; `sleep` advances it instead of waiting."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start
        self.mono = 0.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.mono += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


def rfc3339(ts: float) -> str:
    """Unix seconds as an RFC 3339 UTC string with millisecond precision."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Offsets between the wall clock and the boot clock that differ by less than this are one clock:
# NTP slews both alike, so only a step (or a resume from suspend, which the boot clock counts) moves it.
STEP_TOLERANCE = 1.0


def boot_seconds() -> float:
    """Seconds since boot, counting time suspended (CLOCK_BOOTTIME); monotonic where there is none.

    The step check measures against this rather than the monotonic clock, which stands still while
    the host sleeps: a resume would otherwise look like the wall clock jumping forward.
    """
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def wall_step(offset_before: float, offset_now: float, tolerance: float = STEP_TOLERANCE) -> float:
    """How far the wall clock stepped between two readings of (wall − elapsed); 0.0 within tolerance."""
    step = offset_now - offset_before
    return step if abs(step) >= tolerance else 0.0


class SteppedClock:
    """A clock that notices when the wall clock under it steps, before anyone reads the new time.

    Every `now()` compares wall time against elapsed time; on a step it calls `on_step(seconds)`
    first (positive: forward), so times the daemon stored in the old frame (retry times, failure
    streaks) are moved into the new one before any new time is written beside them. The callback
    must not await: on one event loop, nothing else runs between the step's discovery and its fix.
    """

    def __init__(self, inner: Clock, elapsed: Callable[[], float] | None = None) -> None:
        self.inner = inner
        self._elapsed = elapsed or inner.monotonic
        self.on_step: Callable[[float], None] = lambda _seconds: None
        self._offset = inner.now() - self._elapsed()

    def now(self) -> float:
        wall = self.inner.now()
        offset = wall - self._elapsed()
        step = wall_step(self._offset, offset)
        self._offset = offset
        if step:
            self.on_step(step)
        return wall

    @property
    def offset(self) -> float:
        """Wall time less elapsed time at the last reading: it moves only when the wall clock steps."""
        return self._offset

    def monotonic(self) -> float:
        return self.inner.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)
