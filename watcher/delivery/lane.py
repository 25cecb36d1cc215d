"""One sink's queue state inside the dispatcher, and the small records a lane keeps.

A lane is plain data: the dispatcher reads and changes it, the store never sees it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from watcher.errors import DeliveryError
from watcher.sinks.base import Sink
from watcher.state.records import Due, Outcome


@dataclass
class PassResult:
    attempted: int = 0
    delivered: int = 0
    failed: int = 0
    broken: int = 0  # sinks whose pass ended on an error of the engine or the state file


@dataclass
class Pace:
    """One URL's pacing and throttle, shared by every sink posting to it (Slack limits per hook)."""

    last_send: float = float("-inf")  # monotonic
    paused_until: float = float("-inf")  # monotonic: the receiver at this URL asked us to wait


@dataclass
class Burst:
    """A paced sink's backlog being held until it stops growing, to go out as one digest."""

    began: float  # monotonic
    count: int
    changed: float  # monotonic: when the count last moved


@dataclass
class Unwritten:
    """An attempt whose outcome the state file refused (disk full, read-only): written again later."""

    batch: list[Due]
    outcomes: list[Outcome]
    error: DeliveryError | None
    status: int | None
    duration: float
    at: float  # when the attempt ended (Unix seconds): the time the record carries


@dataclass
class Pass:
    """A `once` pass on one lane: each due delivery is attempted at most once, then the lane ends."""

    began: float  # wall clock: the store leaves out what the pass attempted by comparing with it
    producing: Callable[[], bool]  # whether a poll of the same pass may still commit events
    result: PassResult = field(default_factory=PassResult)
    # Attempted, failed, and due again by `began` (a zero schedule step on a clock that stands
    # still): the one case the store's filter cannot tell, kept here. Empty in practice.
    again: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Wait:
    """How long a worker sleeps before looking again, unless kicked first."""

    seconds: float | None  # None: until kicked (an attempt in flight kicks when it ends)
    # True: until a time on the injected clock (a pace, a pause, a retry falling due).
    # False: an idle sweep for changes made by other processes, in real time.
    scheduled: bool = False


KICKED = Wait(None)  # until kicked: an attempt in flight kicks when it ends


@dataclass
class Lane:
    """One sink's queue state inside the daemon."""

    sink: Sink
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    # Event seq -> the attempt sending it (its result: how many of its events were delivered).
    in_flight: dict[int, asyncio.Task[int]] = field(default_factory=dict)
    # Event seq -> its attempt, sent and waiting for its outcome's commit (delivery.recorder).
    recording: dict[int, asyncio.Task[int]] = field(default_factory=dict)
    off: bool = False  # `enabled = false` in the configuration
    disabled: bool = False  # refused permanently (410, revoked Slack hook) until enabled again
    pace: Pace = field(default_factory=Pace)
    held_until: float = float("-inf")  # monotonic: the state file failed; hold this lane back
    retired: bool = False  # removed or replaced by a reload: the worker finishes and leaves
    burst: Burst | None = None
    last_report: float = float("-inf")
    last_alert: float = float("-inf")
    # Due deliveries read ahead, each the oldest pending event of its resource: one query feeds
    # many sends instead of one query per send.
    ahead: deque[Due] = field(default_factory=deque)
    # Reads resume after the last seq read (a read costs what it returns, not the queue before
    # it) and go back to the start when they reach the end or a sweep has passed: retries fall
    # due and events waiting behind a delivered one become due behind the reader.
    scan_after: int = 0
    last_rewind: float = float("-inf")  # monotonic
    rewind: bool = False  # the next read starts from the beginning (something before scan_after may be due)
    seen_version: int | None = None  # the state file's data_version when `ahead` was read
    read_at: float = float("-inf")  # monotonic: when `ahead` was read
    exhausted: bool = False  # the last look found nothing this lane could send
    passing: Pass | None = None  # set while a `once` pass runs on this lane
    # Outcomes the state file refused, oldest first. Their deliveries still read as pending in the
    # file, so they count as busy: a delivered event is never sent again only because its record
    # failed, and a later event about the same resource still waits behind it.
    unwritten: list[Unwritten] = field(default_factory=list)

    @property
    def busy(self) -> frozenset[int]:
        again = self.passing.again if self.passing is not None else ()
        return frozenset(self.in_flight).union(self.recording, again, (d.seq for u in self.unwritten for d in u.batch))

    @property
    def paused_until(self) -> float:
        return max(self.held_until, self.pace.paused_until)

    @property
    def free(self) -> int:
        return self.sink.config.concurrency - len(set(self.in_flight.values()))
