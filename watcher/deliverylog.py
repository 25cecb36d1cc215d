"""Routine delivery successes, counted per sink and said in one line per sink every few seconds.

journald keeps 10 000 lines per service in 30 s by default and drops the rest, error lines
included: one info line per delivered event let a backlog drain (20 000 deliveries) crowd out
everything else. Each success is still logged at debug; at info a sink's successes become one
line per `SUMMARY_EVERY` seconds with counts by event type. Failures are not counted here: each
failed attempt keeps its own line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("watcher.outbox")

SUMMARY_EVERY = 10.0  # seconds: three lines per sink in journald's 30 s window


@dataclass
class _Counts:
    by_type: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0
    total_duration: float = 0.0


@dataclass
class DeliveryTally:
    """Successes per sink since the last summary; times are monotonic seconds."""

    every: float = SUMMARY_EVERY
    since: float | None = None
    _sinks: dict[str, _Counts] = field(default_factory=dict)

    def add(self, sink: str, event_type: str, duration: float, now: float) -> None:
        if self.since is None:
            self.since = now
        counts = self._sinks.setdefault(sink, _Counts())
        counts.by_type[event_type] += 1
        counts.slowest = max(counts.slowest, duration)
        counts.total_duration += duration

    def add_many(self, sink: str, types: Counter[str], duration: float, now: float) -> None:
        """Successes of one attempt (several, for a pipelined one), each taking `duration`."""
        if self.since is None:
            self.since = now
        counts = self._sinks.setdefault(sink, _Counts())
        counts.by_type.update(types)
        counts.slowest = max(counts.slowest, duration)
        counts.total_duration += duration * types.total()

    def due(self, now: float) -> bool:
        return self.since is not None and now - self.since >= self.every

    def take(self, now: float) -> list[dict[str, Any]]:
        """One summary per sink with successes since the last one (sinks by name), and start afresh."""
        seconds = 0.0 if self.since is None else now - self.since
        lines = []
        for sink, counts in sorted(self._sinks.items()):
            delivered = sum(counts.by_type.values())
            lines.append(
                {
                    "sink": sink,
                    "delivered": delivered,
                    "types": dict(sorted(counts.by_type.items())),
                    "seconds": round(seconds, 1),
                    "mean_duration": round(counts.total_duration / delivered, 4),
                    "max_duration": round(counts.slowest, 4),
                }
            )
        self._sinks.clear()
        self.since = None
        return lines


def say(tally: DeliveryTally, now: float, *, force: bool = False) -> None:
    """Log the summaries when their interval has passed (or now, with `force`: a stop, a pass's end)."""
    if tally.since is None or not (force or tally.due(now)):
        return
    for line in tally.take(now):
        log.info("deliveries", **line)
