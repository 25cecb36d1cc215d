"""The dispatcher: takes due deliveries out of the store and hands them to their sinks.

Each sink has its own worker, its own HTTP client and its own concurrency bound, so a receiver
that hangs or fails never delays another. Within a sink, an event waits while an earlier event
about the same resource is still pending (the store enforces that), so each receiver sees one
lead's or one campaign's events in the order they were detected; unrelated events go concurrently.

What happens to a delivery after an attempt is decided by `decide`, a pure function of the
attempt's error and the sink's schedule.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import structlog

from watcher.clock import Clock
from watcher.errors import DeliveryError, SinkGone
from watcher.schedule import next_attempt_at
from watcher.sinks import Sink
from watcher.store import DEAD, DELIVERED, PENDING, Due, Outcome, Store

log = structlog.get_logger("watcher.outbox")

# A sink failing without a single success for this long is flagged in `status` and the logs.
FAILING_ALERT_AFTER = 3600.0
# More due events than this many seconds of a paced sink's sending turn into one digest message.
DIGEST_AFTER_SECONDS = 3
# Longest a worker sleeps without looking at the store (new rows also wake it at once).
SWEEP_INTERVAL = 5.0


class Metrics(Protocol):
    def delivery(self, sink: str, outcome: str) -> None: ...
    def set_outbox(self, sink: str, pending: int, oldest_age: float) -> None: ...


def decide(due: Due, error: DeliveryError | None, *, now: float, sink: Sink, rng: random.Random) -> Outcome:
    """The state of one delivery after an attempt: delivered, pending with its next time, or dead."""
    if error is None:
        return Outcome(due.seq, due.event_id, DELIVERED, due.attempts + 1, now, None)
    message = str(error)[:500]
    if isinstance(error, SinkGone):
        # Not the event's fault: it waits, untouched, for the sink to be enabled again.
        return Outcome(due.seq, due.event_id, PENDING, due.attempts, now, message)
    attempts = due.attempts + 1
    config = sink.config
    when = next_attempt_at(now, attempts, config.retry_schedule, rng, error.retry_after, due.created_at, config.max_age)
    if when is None:
        return Outcome(due.seq, due.event_id, DEAD, attempts, now, message)
    return Outcome(due.seq, due.event_id, PENDING, attempts, when, message)


def batches(due: Sequence[Due], sink: Sink) -> list[list[Due]]:
    """Singles, or, for a paced sink facing a burst, one digest of as many as it takes."""
    if sink.max_batch > 1 and sink.min_interval > 0 and len(due) > DIGEST_AFTER_SECONDS / sink.min_interval:
        return [list(due[: sink.max_batch])]
    return [[d] for d in due]


@dataclass
class PassResult:
    attempted: int = 0
    delivered: int = 0
    failed: int = 0


class Dispatcher:
    def __init__(
        self,
        store: Store,
        sinks: Sequence[Sink],
        clock: Clock,
        *,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.sinks = list(sinks)
        self.clock = clock
        self.rng = rng or random.Random()
        self.metrics = metrics
        self.on_progress = on_progress
        self._kicks = {s.name: asyncio.Event() for s in self.sinks}
        self._disabled: set[str] = set()
        self._last_alert: dict[str, float] = {}

    def wake(self) -> None:
        """New rows were committed: every worker looks at the store now."""
        for kick in self._kicks.values():
            kick.set()

    def sync_sinks(self, fingerprints: dict[str, str]) -> None:
        """Remember which sinks are disabled; a sink whose configuration changed is enabled again."""
        for sink in self.sinks:
            if not sink.config.enabled or self.store.sync_sink(sink.name, fingerprints[sink.name]):
                self._disabled.add(sink.name)

    # --- the daemon's loop --------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event, grace: float = 5.0) -> None:
        workers = [asyncio.create_task(self._worker(sink, stopping), name=f"sink:{sink.name}") for sink in self.sinks]
        if workers:
            await asyncio.gather(*workers)

    async def _worker(self, sink: Sink, stopping: asyncio.Event) -> None:
        kick = self._kicks[sink.name]
        in_flight: dict[int, asyncio.Task[bool]] = {}
        last_send = float("-inf")
        while not stopping.is_set():
            kick.clear()
            self.on_progress()
            free = sink.config.concurrency - len({id(t) for t in in_flight.values()})
            due: list[Due] = []
            if sink.name not in self._disabled and free > 0:
                due = self.store.due(sink.name, self.clock.now(), free * sink.max_batch, frozenset(in_flight))
            if not due:
                await self._idle(sink, kick, stopping)
                continue
            for batch in batches(due, sink)[:free]:
                if sink.min_interval > 0:
                    wait = last_send + sink.min_interval - self.clock.monotonic()
                    if wait > 0 and await _wait(stopping, wait):
                        break
                    last_send = self.clock.monotonic()
                task = asyncio.create_task(self._attempt(sink, batch))
                for d in batch:
                    in_flight[d.seq] = task
                task.add_done_callback(partial(self._finished, in_flight, batch, kick))
        # Stopping: let attempts in flight finish briefly; an interrupted one stays pending and is sent again.
        pending = set(in_flight.values())
        if pending:
            _done, still = await asyncio.wait(pending, timeout=5.0)
            for task in still:
                task.cancel()

    def _finished(
        self, in_flight: dict[int, asyncio.Task[bool]], batch: list[Due], kick: asyncio.Event, _task: object
    ) -> None:
        for d in batch:
            in_flight.pop(d.seq, None)
        kick.set()

    async def _idle(self, sink: Sink, kick: asyncio.Event, stopping: asyncio.Event) -> None:
        timeout = SWEEP_INTERVAL
        if sink.name not in self._disabled:
            next_due = self.store.next_due_at(sink.name)
            if next_due is not None:
                timeout = min(timeout, max(0.01, next_due - self.clock.now()))
        waiters = [asyncio.ensure_future(kick.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self._report(sink)

    def _report(self, sink: Sink) -> None:
        if self.metrics is None:
            return
        for state in self.store.sink_states([sink.name]):
            if state.name == sink.name:
                age = self.clock.now() - state.oldest_pending_at if state.oldest_pending_at else 0.0
                self.metrics.set_outbox(sink.name, state.pending, age)

    # --- one attempt --------------------------------------------------------------------------

    async def _attempt(self, sink: Sink, batch: Sequence[Due]) -> bool:
        events = [d.event() for d in batch]
        started = self.clock.monotonic()
        error: DeliveryError | None = None
        status: int | None = None
        try:
            attempt = await sink.deliver(events)
            status = attempt.status
        except DeliveryError as exc:
            error, status = exc, exc.status
        except Exception as exc:  # a bug in a sink must not lose the event: it is retried like a failure
            log.exception("sink raised an unexpected error", sink=sink.name)
            error = DeliveryError(f"internal error: {type(exc).__name__}")
        duration = round(self.clock.monotonic() - started, 4)
        now = self.clock.now()
        outcomes = [decide(d, error, now=now, sink=sink, rng=self.rng) for d in batch]
        self.store.record_outcomes(
            sink.name, outcomes, now=now, status_code=status, duration=duration, success=error is None
        )
        self._after(sink, batch, outcomes, error, status, duration)
        return error is None

    def _after(
        self,
        sink: Sink,
        batch: Sequence[Due],
        outcomes: Sequence[Outcome],
        error: DeliveryError | None,
        status: int | None,
        duration: float,
    ) -> None:
        for due, outcome in zip(batch, outcomes, strict=True):
            kind = {DELIVERED: "success", DEAD: "dead"}.get(outcome.status, "retry")
            if isinstance(error, SinkGone):
                kind = "disabled"
            if self.metrics is not None:
                self.metrics.delivery(sink.name, kind)
            fields = dict(
                sink=sink.name,
                event_id=due.event_id,
                type=due.type,
                attempt=outcome.attempts,
                status=status,
                duration=duration,
                outcome=kind,
            )
            if error is None:
                log.info("delivered", **fields)
            elif outcome.status == DEAD:
                log.error("delivery dead: schedule or max_age exhausted", error=outcome.error, **fields)
            else:
                log.warning("delivery failed", error=outcome.error, next_attempt_at=outcome.next_attempt_at, **fields)
        if isinstance(error, SinkGone):
            self._disabled.add(sink.name)
            self.store.disable_sink(sink.name, self.clock.now(), str(error)[:500])
            log.error(
                "sink disabled: the receiver says it will never accept these events; they stay queued "
                "until the sink is enabled again (change its config, or `replay --sink`)",
                sink=sink.name,
                status=status,
                reason=str(error)[:200],
            )
        elif error is not None:
            self._alert_if_failing(sink)

    def _alert_if_failing(self, sink: Sink) -> None:
        now = self.clock.now()
        for state in self.store.sink_states([sink.name]):
            if state.name != sink.name or state.failing_since is None:
                continue
            if now - state.failing_since >= FAILING_ALERT_AFTER and now - self._last_alert.get(sink.name, 0) >= 600:
                self._last_alert[sink.name] = now
                log.error(
                    "sink failing without a success", sink=sink.name, failing_for=round(now - state.failing_since)
                )

    # --- `once` -------------------------------------------------------------------------------

    async def deliver_due_once(self) -> PassResult:
        """Attempt every due delivery once (in per-resource order); report what happened."""
        results = await asyncio.gather(*(self._pass(sink) for sink in self.sinks if sink.name not in self._disabled))
        total = PassResult()
        for r in results:
            total.attempted += r.attempted
            total.delivered += r.delivered
            total.failed += r.failed
        return total

    async def _pass(self, sink: Sink) -> PassResult:
        result = PassResult()
        tried: set[int] = set()
        last_send = float("-inf")
        while sink.name not in self._disabled:
            due = self.store.due(
                sink.name, self.clock.now(), sink.config.concurrency * sink.max_batch, frozenset(tried)
            )
            if not due:
                break
            groups = batches(due, sink)
            for group in groups:
                tried.update(d.seq for d in group)
            if sink.min_interval > 0:
                oks = []
                for group in groups:
                    wait = last_send + sink.min_interval - self.clock.monotonic()
                    if wait > 0:
                        await self.clock.sleep(wait)
                    last_send = self.clock.monotonic()
                    oks.append(await self._attempt(sink, group))
            else:
                oks = list(await asyncio.gather(*(self._attempt(sink, g) for g in groups)))
            for group, ok in zip(groups, oks, strict=True):
                result.attempted += len(group)
                if ok:
                    result.delivered += len(group)
                else:
                    result.failed += len(group)
        return result


async def _wait(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True when the daemon started stopping meanwhile."""
    try:
        await asyncio.wait_for(stopping.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True
