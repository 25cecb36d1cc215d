"""The recorder of delivery outcomes: what attempts ended in one turn of the loop, in one transaction."""

from __future__ import annotations

import asyncio

from watcher.store import Recorded, Store


class Recorder:
    """Writes an attempt's outcomes together with those of every attempt finishing in the same turn
    of the event loop: one transaction for a burst of answers instead of one each."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: list[tuple[Recorded, asyncio.Future[None]]] = []  # written at the loop's next turn

    def record(self, attempt: Recorded) -> asyncio.Future[None]:
        """A future that is done once `attempt` is written, or holds the error that refused it."""
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._write)
        self._waiting.append((attempt, written))
        return written

    def _write(self) -> None:
        batch, self._waiting = self._waiting, []
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
