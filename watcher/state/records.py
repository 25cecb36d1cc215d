"""The state layer's records: what the walks, the outbox and sink health read and write.

Detection's own records (snapshots, page commits) live in `watcher.records`; these are the
outbox's and the state file's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from watcher.events import Event, loads

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
# The phrase an attempt's error ends with when its answer carried a Retry-After: for people reading
# the error. The state keeps the fact itself in a column (`Outcome.asked_to_wait`).
ASKED_TO_WAIT = "receiver asked to wait"


@dataclass(frozen=True)
class Cursor:
    stream: str
    cursor: str | None
    cursor_ts: float | None
    walk_from: str | None
    baseline_until: float | None
    last_poll_at: float | None
    last_success_at: float | None
    last_error: str | None
    polls: int
    floor: float | None = None  # created stream: leads created before this are the baseline, never announced
    progress: int | None = None  # pages a resumable walk has committed
    resume_after: int | None = None  # the last id a resumable walk committed


@dataclass(frozen=True)
class Due:
    """A pending delivery whose time has come."""

    seq: int
    sink: str
    event_id: str
    type: str
    resource: str
    campaign_id: int | None
    payload: str
    attempts: int
    created_at: float

    def event(self) -> Event:
        body = loads(self.payload)
        return Event(
            id=self.event_id,
            type=self.type,
            timestamp=body["timestamp"],
            data=body["data"],
            resource=self.resource,
            campaign_id=self.campaign_id,
        )


@dataclass(frozen=True)
class SinkState:
    name: str
    disabled_at: float | None
    disabled_reason: str | None
    failing_since: float | None
    last_success_at: float | None
    pending: int
    dead: int
    delivered: int
    oldest_pending_at: float | None

    def stranded(self, configured: Iterable[str]) -> bool:
        """A sink the configuration no longer names still holds events nothing will send."""
        return self.name not in set(configured) and self.pending + self.dead > 0


@dataclass(frozen=True)
class Outcome:
    """What one attempt did to one delivery; decided by the outbox, written here."""

    seq: int
    event_id: str
    status: str  # pending / delivered / dead
    attempts: int  # the delivery's attempt count from now on (what the schedule counts)
    next_attempt_at: float
    error: str | None
    attempt: int | None = None  # this attempt's number in the attempt log, when it differs from `attempts`
    excerpt: str | None = None  # the start of the receiver's answer to this attempt, for the attempt log
    resource: str | None = None  # the event's resource, for the attempt log (looked up when not given)
    asked_to_wait: bool = False  # the answer carried a Retry-After: no re-timing may shorten this wait

    @property
    def logged_attempt(self) -> int:
        return self.attempt if self.attempt is not None else self.attempts


@dataclass(frozen=True)
class Recorded:
    """One attempt's outcomes with what the attempt log and the sink's health keep of it."""

    sink: str
    outcomes: tuple[Outcome, ...]
    now: float
    status_code: int | None
    duration: float
    success: bool
