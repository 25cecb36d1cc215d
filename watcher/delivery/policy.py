"""Delivery policy: pure decisions about one attempt's outcome, grouping and pauses.

No I/O here: each function takes what it needs (the due row, the error, the sink's configuration,
the time, a random source) and returns the decision, so the tables in tests/test_outbox.py can
pin them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from typing import Protocol, TypeGuard, runtime_checkable

from watcher.errors import DeliveryError, Interrupted, SinkGone, Throttled
from watcher.events import Event
from watcher.logs import known_secrets, scrub
from watcher.pii import mask_text
from watcher.schedule import RETRY_AFTER_FLOOR_CAP, next_attempt_at
from watcher.sinks.base import Attempt, Sink
from watcher.state.records import ASKED_TO_WAIT, DEAD, DELIVERED, PENDING, Due, Outcome

# A sink failing without a single success for this long is flagged in `status` and the logs.
FAILING_ALERT_AFTER = 3600.0
# More due events than this many seconds of a paced sink's sending turn into one digest message.
DIGEST_AFTER_SECONDS = 3
# A burst is sent once it has stopped growing for this long (a backfill commits page after page),
# or once it has been held this long: a long backfill costs one digest per BURST_HOLD, whatever its size.
BURST_SETTLE = 2.0
BURST_HOLD = 60.0
# The most deliveries one digest settles. Only their ids and types are read (the sample's bodies
# alone), so this bounds memory, not messages: 50 000 rows are a few MB.
DIGEST_LIMIT = 50_000
# Enough of an answer for an operator to see why a receiver refused (`events --attempts`), and
# little enough that the attempt log stays small and a receiver's echo of a payload stays cut.
ATTEMPT_EXCERPT_CHARS = 200


@runtime_checkable
class PipelinedSink(Protocol):
    """A sink that sends up to `max_batch` events in one attempt, each with its own outcome (the
    broker sinks: publish them all, then await every confirmation)."""

    async def deliver_each(self, events: Sequence[Event]) -> list[Attempt | DeliveryError]: ...


_PIPELINED: dict[type, bool] = {}


def pipelined(sink: Sink) -> TypeGuard[PipelinedSink]:
    """Whether `sink` is a PipelinedSink. Asked for every attempt, and a runtime Protocol check
    walks the protocol's members each time: answered once per sink class instead."""
    known = _PIPELINED.get(type(sink))
    if known is None:
        known = _PIPELINED[type(sink)] = isinstance(sink, PipelinedSink)
    return known


def decide(
    due: Due,
    error: DeliveryError | None,
    *,
    now: float,
    sink: Sink,
    rng: random.Random,
    excerpt: str | None = None,
) -> Outcome:
    """The state of one delivery after an attempt: delivered, pending with its next time, or dead."""
    attempt = due.attempts + 1
    if error is None:  # the common case, built directly: a pipelined sink decides thousands a second
        return Outcome(due.seq, due.event_id, DELIVERED, attempt, now, None, excerpt=excerpt, resource=due.resource)
    asked = error.retry_after is not None
    outcome = partial(Outcome, due.seq, due.event_id, excerpt=excerpt, resource=due.resource, asked_to_wait=asked)
    message = str(error)[:500]
    if error.retry_after is not None:
        # Said in the error for people; the outcome's asked_to_wait keeps it for a later re-timing.
        message = f"{message} ({ASKED_TO_WAIT} {error.retry_after:g} s)"
    if isinstance(error, SinkGone | Interrupted):
        # Not the event's fault: it waits, its schedule untouched, for the sink to be enabled again
        # (or, interrupted, for the next start or the reloaded sink).
        return outcome(PENDING, due.attempts, now, message, attempt)
    config = sink.config
    when = next_attempt_at(now, attempt, config.retry_schedule, rng, error.retry_after, due.created_at, config.max_age)
    if when is None:
        return outcome(DEAD, attempt, now, message)
    return outcome(PENDING, attempt, when, message)


def attempt_excerpt(text: str) -> str | None:
    """What the attempt log keeps of an answer: secrets, e-mail addresses and phone numbers masked, on
    one line, short (a receiver's error may quote the person it refused)."""
    if not text:
        return None  # the usual answer to a delivery (204): nothing to mask
    flat = " ".join(mask_text(scrub(text, known_secrets())).split())
    return flat[:ATTEMPT_EXCERPT_CHARS] or None


def bursting(count: int, sink: Sink) -> bool:
    """Whether this many due events are more than a paced sink should send one by one."""
    return sink.max_batch > 1 and sink.min_interval > 0 and count > DIGEST_AFTER_SECONDS / sink.min_interval


def batches(due: Sequence[Due], sink: Sink) -> list[list[Due]]:
    """Singles; for a paced sink facing a burst, one digest of all of them (however many); for a
    pipelined sink, groups of up to `max_batch`. The rows are at most one per resource (the store
    hands out only each resource's oldest pending event), so no group holds two events of one
    lead or campaign, and a group's events may go in any order."""
    if bursting(len(due), sink):
        return [list(due)]
    size = sink.max_batch
    if size > 1 and pipelined(sink):
        return [list(due[i : i + size]) for i in range(0, len(due), size)]
    return [[d] for d in due]


def pause_for(error: DeliveryError | None) -> float:
    """Seconds the whole sink holds back after this error: a receiver's Retry-After on a throttle."""
    if isinstance(error, Throttled) and error.retry_after is not None:
        # A rate limit is the endpoint's (Slack's is per URL), so every event waits, not just this one.
        return min(max(0.0, error.retry_after), RETRY_AFTER_FLOOR_CAP)
    return 0.0
