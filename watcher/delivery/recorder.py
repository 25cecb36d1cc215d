"""The recorder of delivery outcomes: group commit of finished attempts.

An outcome waits a little for others to share its transaction: the store's per-transaction cost
(BEGIN, COMMIT, the sink's health row) is then paid once for many deliveries, not once each. The
wait is bounded by a count and by a short time, and cut short when nothing is being sent that
could join (a single event, or a lead's next event waiting behind this one, never waits).

Until its outcome is committed a delivery reads as pending in the state file: the dispatcher
keeps it busy, and a later event about the same resource stays behind it. An outcome lost with
the process before its commit only means the event is sent again under the same webhook-id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from watcher.clock import Clock
from watcher.state.records import Recorded
from watcher.state.store import Store

# The longest an outcome waits for others while attempts are still being sent: short beside any
# receiver's answer, long enough that a fast broker's confirmations share a transaction.
GROUP_WINDOW = 0.02
# The most outcomes one transaction writes: a full group is written at once.
GROUP_LIMIT = 256


class Recorder:
    """Writes finished attempts' outcomes in shared transactions (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        sending: Callable[[], bool] = lambda: False,
        window: float = GROUP_WINDOW,
        limit: int = GROUP_LIMIT,
    ) -> None:
        self._store = store
        self._clock = clock
        self._sending = sending  # whether an attempt is still out that may finish within the window
        self._window = window
        self._limit = limit
        self._waiting: list[tuple[Recorded, asyncio.Future[None]]] = []
        self._outcomes = 0  # outcomes in _waiting
        self._since = 0.0  # the injected clock's monotonic time when the oldest of them finished
        self._timer: asyncio.TimerHandle | None = None
        self._turn: asyncio.Handle | None = None

    def record(self, attempt: Recorded) -> asyncio.Future[None]:
        """A future that is done once `attempt` is written, or holds the error that refused it."""
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        if not self._waiting:
            self._since = self._clock.monotonic()
        self._waiting.append((attempt, written))
        self._outcomes += len(attempt.outcomes)
        if self._timer is None:
            # In real time, for when nothing else comes to check the window on the injected clock.
            self._timer = loop.call_later(self._window, self.flush)
        if self._turn is None:
            # At the next turn of the loop, once the lanes have started what this attempt freed:
            # with nothing out that could join, waiting gains nothing.
            self._turn = loop.call_soon(self._settle)
        return written

    def _settle(self) -> None:
        self._turn = None
        late = self._clock.monotonic() - self._since >= self._window
        if late or self._outcomes >= self._limit or not self._sending():
            self.flush()

    def flush(self) -> None:
        """Write every waiting outcome now, in one transaction."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
        batch, self._waiting, self._outcomes = self._waiting, [], 0
        if not batch:
            return
        try:
            self._store.record_attempts([attempt for attempt, _ in batch])
        except Exception as exc:  # each attempt keeps its outcome in memory (the dispatcher retries the write)
            for _, written in batch:
                if not written.done():
                    written.set_exception(exc)
            return
        for _, written in batch:
            if not written.done():
                written.set_result(None)
