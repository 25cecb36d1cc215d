"""The dispatcher: takes due deliveries out of the store and hands them to their sinks.

Each sink has its own lane: a worker task, its own HTTP client (built with the sink), its own
concurrency bound, pacing and pause. A receiver that hangs or fails therefore never delays
another. Within a sink, an event waits while an earlier event about the same resource is still
pending (the store enforces that), so each receiver sees one lead's or one campaign's events in
the order they were detected; unrelated events go concurrently.

What happens to a delivery after an attempt is decided by `policy.decide`, a pure function of the
attempt's error and the sink's schedule; how due events are grouped into sends by `batches`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import structlog

from watcher.clock import Clock
from watcher.config import SinkConfig
from watcher.delivery.lane import KICKED, Burst, Lane, Pace, Pass, PassResult, Unwritten, Wait
from watcher.delivery.policy import (
    BURST_HOLD,
    BURST_SETTLE,
    DIGEST_LIMIT,
    FAILING_ALERT_AFTER,
    attempt_excerpt,
    batches,
    bursting,
    decide,
    pause_for,
    pipelined,
)
from watcher.delivery.recorder import Recorder
from watcher.delivery.stored import stored_event
from watcher.deliverylog import DeliveryTally, say
from watcher.errors import DeliveryError, Interrupted, SinkGone, StateDamaged, WatcherError
from watcher.events import Event
from watcher.sinks.base import Attempt, Sink
from watcher.state.records import DEAD, DELIVERED, PENDING, Due, Outcome, Recorded
from watcher.state.store import Store

if TYPE_CHECKING:
    from watcher.metrics import DeliveryMetrics

log = structlog.get_logger("watcher.outbox")
_debug = logging.getLogger("watcher.outbox")  # the stdlib logger behind `log`: is debug on at all?

# Longest a worker sleeps without looking at the store. Our own commits wake it at once; this
# bounds how late it notices another process's (`replay` re-queuing events, re-enabling a sink).
SWEEP_INTERVAL = 1.0
# How many due deliveries one query reads ahead for a sink, at least: a pipelined sink reads what
# fills all its attempts (each read pays for its busy list and the per-resource check, whatever it returns).
READ_AHEAD = 64
_SWEEP = Wait(SWEEP_INTERVAL)  # an idle look for changes made by other processes
# After the state file refused a read or write: wait this long before touching it (or a receiver) again.
ERROR_BACKOFF = 5.0
# Least time between two outbox gauge refreshes for one sink (they count every row).
REPORT_INTERVAL = 5.0
STOPPED = "no answer before the daemon stopped waiting (the receiver may have it); sent again"


@runtime_checkable
class DigestSink(Protocol):
    """A sink that can sum up a whole burst in one message: the count of each type and a sample."""

    async def deliver_digest(self, sample: Sequence[Event], counts: Mapping[str, int]) -> Attempt: ...


class Dispatcher:
    def __init__(
        self,
        store: Store,
        sinks: Sequence[Sink],
        clock: Clock,
        *,
        rng: random.Random | None = None,
        metrics: DeliveryMetrics | None = None,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.sinks = list(sinks)
        self.clock = clock
        self.rng = rng or random.Random()
        self.metrics = metrics
        self.on_progress = on_progress
        self.tally = DeliveryTally()  # successes are logged as counts per sink (watcher.deliverylog)
        # Why the last outcome write failed, while any outcome waits in memory (health goes red).
        self.write_error: str | None = None
        self.damaged: str | None = None  # SQLite found the state file corrupt: said once, health red
        # Kept across reloads, so a sink re-created with a new config keeps its URL's pace and pause.
        self._paces: dict[str, Pace] = {}
        self._lanes = {s.name: self._lane(s) for s in self.sinks}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._run: tuple[asyncio.Event, float] | None = None  # (stopping, grace) while `run` runs
        self._recorder = Recorder(store, clock, sending=self._sending)

    def _sending(self) -> bool:
        return any(lane.in_flight for lane in self._lanes.values())

    def _lane(self, sink: Sink) -> Lane:
        return Lane(sink, off=not sink.config.enabled, pace=self._paces.setdefault(sink.config.url, Pace()))

    def wake(self) -> None:
        """New rows were committed: every worker looks at the store now."""
        for lane in self._lanes.values():
            lane.kick.set()

    def sync_sinks(self, fingerprints: dict[str, str]) -> None:
        """Remember which sinks are disabled (a sink whose configuration changed is enabled again),
        and re-time waiting retries on each sink's current retry_schedule."""
        for lane in self._lanes.values():
            lane.disabled = self.store.sync_sink(lane.sink.name, fingerprints[lane.sink.name])
            if lane.disabled and not lane.off:
                log.error(
                    "sink is disabled: its events stay queued until its configuration changes "
                    "or `replay --sink` enables it",
                    sink=lane.sink.name,
                )
            moved = self.store.reschedule(lane.sink.name, lane.sink.config.retry_schedule)
            if moved:
                log.info("waiting retries re-timed on the sink's retry_schedule", sink=lane.sink.name, deliveries=moved)
            lane.kick.set()

    async def reconfigure(self, configs: Sequence[SinkConfig], build: Callable[[SinkConfig], Sink]) -> list[Sink]:
        """Apply a reloaded sink list: unchanged sinks keep their lane, the rest are rebuilt or retired.

        A retired lane's worker lets its attempts in flight finish (they are recorded as usual)
        before its HTTP client closes; a new lane starts reading the queue where the old one left it.
        Returns the sinks now in use.
        """
        wanted = {c.name: c for c in configs}
        retire = [lane for name, lane in self._lanes.items() if wanted.get(name) != lane.sink.config]
        for lane in retire:
            lane.retired = True
            lane.kick.set()
        # Outcomes the state file refused stay with the sink's name: the new lane keeps their rows
        # busy and writes them, rather than send delivered events again.
        carried: dict[str, list[Unwritten]] = {}
        for lane in retire:
            worker = self._workers.pop(lane.sink.name, None)
            if worker is not None:
                await worker
            else:
                await self._drain(lane, 5.0)
            carried[lane.sink.name] = lane.unwritten
            del self._lanes[lane.sink.name]
            with suppress(Exception):
                await lane.sink.aclose()
        for name, cfg in wanted.items():
            if name not in self._lanes:
                lane = self._lane(build(cfg))
                lane.unwritten = carried.pop(name, [])
                self._lanes[name] = lane
                if self._run is not None and not self._run[0].is_set():
                    self._start(lane, *self._run)
        self._lanes = {name: self._lanes[name] for name in wanted}
        self.sinks = [lane.sink for lane in self._lanes.values()]
        return list(self.sinks)

    # --- the daemon's loop --------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event, grace: float = 5.0) -> None:
        """Deliver until `stopping` is set; then give attempts in flight `grace` seconds to finish."""
        self._run = (stopping, grace)
        for lane in self._lanes.values():
            self._start(lane, stopping, grace)
        # Until the stop, not until the workers end: a reload retires some and starts others meanwhile.
        await stopping.wait()
        self._run = None
        self.wake()  # workers waiting for work see the stop at once
        workers = list(self._workers.values())
        if workers:
            await asyncio.gather(*workers)
        self._recorder.flush()
        say(self.tally, self.clock.monotonic(), force=True)

    def _start(self, lane: Lane, stopping: asyncio.Event, grace: float) -> None:
        name = lane.sink.name
        self._workers[name] = asyncio.create_task(self._worker(lane, stopping, grace), name=f"sink:{name}")

    async def _worker(self, lane: Lane, stopping: asyncio.Event, grace: float) -> None:
        while not (stopping.is_set() or lane.retired):
            lane.kick.clear()
            self.on_progress()
            say(self.tally, self.clock.monotonic())
            try:
                wait = self._launch(lane)
            except Exception as exc:  # a broken state file or a bug must not end this sink's deliveries
                if lane.passing is not None:
                    # A pass leaves the sink to the next run rather than retry an error forever.
                    log.error("delivery pass stopped for this sink", sink=lane.sink.name, error=str(exc)[:300])
                    lane.passing.result.broken += 1
                    break
                if not isinstance(exc, StateDamaged):
                    log.error("delivery worker error; trying again shortly", sink=lane.sink.name, error=str(exc)[:300])
                elif self.damaged is None:  # said once, then tried again quietly: it will not mend by itself
                    self.damaged = str(exc)[:300]
                    log.error("state file is damaged: deliveries wait until it is recovered", error=self.damaged)
                wait = Wait(ERROR_BACKOFF)
            if lane.passing is not None and self._pass_over(lane):
                break
            await self._sleep(lane.kick, stopping, wait)
            if not lane.retired:
                self._report(lane)
        await self._drain(lane, grace)

    def _pass_over(self, lane: Lane) -> bool:
        """Whether a `once` pass has nothing left to try on this lane (attempts in flight finish first)."""
        assert lane.passing is not None
        if lane.in_flight or lane.recording:
            return False
        # A sink that is off, disabled, paused by its receiver or unable to record is left for this pass.
        if lane.off or lane.disabled or lane.unwritten or lane.paused_until > self.clock.monotonic():
            return True
        return lane.exhausted and not lane.ahead and not lane.passing.producing()

    def _launch(self, lane: Lane) -> Wait:
        """Start every send this lane may start now; return how long to sleep before looking again."""
        lane.exhausted = False
        if lane.unwritten and not self._write_back(lane):
            return Wait(ERROR_BACKOFF)  # nothing new goes out while the file cannot record what it did
        sink = lane.sink
        if lane.off:
            return _SWEEP
        if lane.disabled:
            if self.store.sink_disabled(sink.name):
                return _SWEEP
            lane.disabled = False
            log.warning("sink enabled again; its queued events go out in order", sink=sink.name)
        mono = self.clock.monotonic()
        if lane.paused_until > mono:
            return Wait(min(SWEEP_INTERVAL, lane.paused_until - mono), scheduled=True)
        if lane.free <= 0:
            return KICKED  # a finishing attempt wakes the worker
        if sink.min_interval > 0:
            return self._launch_paced(lane)
        version = self.store.outside_writes()
        if version != lane.seen_version or (lane.ahead and mono - lane.read_at >= SWEEP_INTERVAL):
            # Read again, from the start, when another process wrote (replay, `forget`, a moved sink:
            # rows read ahead may be gone, others due before them) and once a sweep (a retry due by
            # now, or an event freed by one just delivered, must not wait behind the read-ahead).
            lane.seen_version = version
            lane.ahead.clear()
            lane.rewind = True
        # Unpaced (webhooks): as many singles as the sink's concurrency allows.
        while lane.free > 0:
            if not lane.ahead:
                lane.ahead.extend(self._read_ahead(lane, lane.free * sink.max_batch))
            if not lane.ahead:
                return self._idle(lane)
            due = [lane.ahead.popleft() for _ in range(min(lane.free * sink.max_batch, len(lane.ahead)))]
            for group in batches(due, sink):
                self._send(lane, group)
        return KICKED

    def _read_ahead(self, lane: Lane, want: int) -> list[Due]:
        """The next due deliveries for this lane, resuming where its last read ended."""
        sink, now, mono = lane.sink.name, self.clock.now(), self.clock.monotonic()
        passing = lane.passing.began if lane.passing is not None else None
        limit = max(want, READ_AHEAD, lane.sink.config.concurrency * lane.sink.max_batch)
        if lane.scan_after and not lane.rewind and mono - lane.last_rewind >= SWEEP_INTERVAL:
            # Another process may have made earlier rows due (replay): look back once a sweep, if
            # anything is due at all. A read from the start walks every waiting retry before it.
            lane.last_rewind = mono
            upcoming = self.store.next_due_at(sink, lane.busy)
            lane.rewind = upcoming is not None and upcoming <= now
        if lane.rewind:
            lane.scan_after, lane.rewind, lane.last_rewind = 0, False, mono
        rows = self.store.due(sink, now, limit, lane.busy, after=lane.scan_after, passing=passing)
        if len(rows) < limit and lane.scan_after and lane.passing is not None:
            # A pass at the end of the queue: what is due before where this read began comes next.
            lane.scan_after, lane.last_rewind = 0, mono
            busy = lane.busy.union(d.seq for d in rows)
            rows += self.store.due(sink, now, limit - len(rows), busy, passing=passing)
        if rows:
            lane.scan_after = rows[-1].seq
        lane.read_at = mono
        return rows

    def _idle(self, lane: Lane) -> Wait:
        """Nothing due: sleep until the next delivery falls due, or a sweep."""
        lane.exhausted = True
        if lane.passing is not None:
            return _SWEEP  # a pass never waits for a retry: new commits and finishing attempts wake it
        upcoming = self.store.next_due_at(lane.sink.name, lane.busy)
        if upcoming is None:
            return _SWEEP
        now = self.clock.now()
        if upcoming <= now:
            lane.rewind = True  # due, but before where the reads have got to
        return Wait(min(SWEEP_INTERVAL, max(0.01, upcoming - now)), scheduled=True)

    def _send(self, lane: Lane, group: list[Due]) -> None:
        task = asyncio.create_task(self._attempt(lane, group), name=f"attempt:{lane.sink.name}")
        for d in group:
            lane.in_flight[d.seq] = task
        task.add_done_callback(partial(self._finished, lane, group))

    def _launch_paced(self, lane: Lane) -> Wait:
        """A paced sink (Slack): one message at a time, singles while it is quiet, and a burst held
        until it settles, then sent as one digest of all of it.

        The hold is what keeps a backfill cheap: its pages commit one after another, and a digest
        per page would cost a message per page. Pace and throttle are the URL's, across sinks.
        """
        sink = lane.sink
        mono, now = self.clock.monotonic(), self.clock.now()
        passing = lane.passing.began if lane.passing is not None else None
        count = self.store.due_count(sink.name, now, passing=passing) - len(lane.busy)
        if count <= 0:
            lane.burst = None
            return self._idle(lane)
        if lane.pace.last_send + sink.min_interval > mono:
            return Wait(lane.pace.last_send + sink.min_interval - mono, scheduled=True)
        if lane.burst is None and not bursting(count, sink):
            group = self.store.due(sink.name, now, 1, lane.busy, passing=passing)
        else:
            if lane.burst is None:
                lane.burst = Burst(began=mono, count=count, changed=mono)
            elif count != lane.burst.count:
                lane.burst.count, lane.burst.changed = count, mono
            ready = min(lane.burst.changed + BURST_SETTLE, lane.burst.began + BURST_HOLD)
            # A pass whose polls are done has seen the whole burst: nothing to wait for.
            settled = lane.passing is not None and not lane.passing.producing()
            if ready > mono and not settled:
                return Wait(min(SWEEP_INTERVAL, ready - mono), scheduled=True)
            group = self.store.due_digest(sink.name, now, sink.max_batch, DIGEST_LIMIT, lane.busy, passing=passing)
            lane.burst = None
        if not group:
            return self._idle(lane)
        self._send(lane, group)
        lane.pace.last_send = self.clock.monotonic()
        return KICKED  # the attempt finishing wakes the worker, which then keeps the pace

    def _finished(self, lane: Lane, group: Sequence[Due], task: asyncio.Task[int]) -> None:
        for d in group:
            lane.in_flight.pop(d.seq, None)
            lane.recording.pop(d.seq, None)
        lane.kick.set()
        failed = task.cancelled() or task.exception() is not None
        if not task.cancelled() and task.exception() is not None:
            # The outcome may not be recorded: the deliveries stay pending and are sent again.
            log.error("delivery attempt failed unexpectedly", sink=lane.sink.name, error=repr(task.exception())[:300])
        if lane.passing is not None:
            result = lane.passing.result
            result.attempted += len(group)
            taken = 0 if failed else task.result()
            result.delivered += taken
            result.failed += len(group) - taken

    async def _sleep(self, kick: asyncio.Event, stopping: asyncio.Event, wait: Wait) -> None:
        """Wait until kicked, stopping, or the wait is over (on the injected clock when scheduled)."""
        if kick.is_set() or stopping.is_set():
            return
        if wait.seconds is None:
            await kick.wait()  # `run` kicks every lane when it stops
            return
        if not wait.scheduled:
            # The common case: a bare timed wait on the kick, rather than futures raced together.
            with suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait.seconds)):
                    await kick.wait()
            return
        waiters: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(kick.wait()),
            asyncio.ensure_future(stopping.wait()),
        ]
        if wait.scheduled:
            waiters.append(asyncio.ensure_future(self.clock.sleep(wait.seconds or 0.0)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _drain(self, lane: Lane, grace: float) -> None:
        # Stopping: let attempts in flight finish briefly; an interrupted one stays pending and is sent again.
        pending = set(lane.in_flight.values()).union(lane.recording.values())
        if pending:
            _done, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if lane.unwritten and not self._write_back(lane):
            # Lost with the process: these go again after the restart (same ids, at least once).
            log.error("delivery outcomes could not be written before the stop", sink=lane.sink.name)

    def _write_back(self, lane: Lane) -> bool:
        """Write the outcomes the state file refused earlier, in order; True once none is left."""
        while lane.unwritten:
            u = lane.unwritten[0]
            try:
                self.store.record_outcomes(
                    lane.sink.name,
                    u.outcomes,
                    now=u.at,
                    status_code=u.status,
                    duration=u.duration,
                    success=u.error is None,
                )
            except WatcherError as exc:
                self.write_error = str(exc)[:300]
                return False
            lane.unwritten.pop(0)
            log.warning("delivery outcome written after the state file recovered", sink=lane.sink.name)
            self._after(lane, u.batch, u.outcomes, u.error, u.status, u.duration)
        if not any(other.unwritten for other in self._lanes.values()):
            self.write_error = None
        return True

    def _report(self, lane: Lane) -> None:
        mono = self.clock.monotonic()
        if self.metrics is None or mono - lane.last_report < REPORT_INTERVAL:
            return
        lane.last_report = mono
        try:
            state = self.store.sink_state(lane.sink.name)
        except WatcherError:
            return
        age = self.clock.now() - state.oldest_pending_at if state.oldest_pending_at else 0.0
        self.metrics.set_outbox(lane.sink.name, state.pending, age)

    # --- one attempt --------------------------------------------------------------------------

    async def _attempt(self, lane: Lane, batch: Sequence[Due]) -> int:
        """Send one group once and record what happened; how many of its events the receiver took."""
        sink = lane.sink
        # A digest's rows beyond its sample carry no body (see Store.due_digest): they are counted.
        events = [stored_event(d) for d in batch if d.payload]
        started = self.clock.monotonic()
        # Per event: the error that kept it from being taken, or None (taken), and the answer.
        errors: list[DeliveryError | None]
        answers: list[str]
        status: int | None = None
        try:
            if len(batch) > 1 and pipelined(sink):
                results = await sink.deliver_each(events)
                errors = [r if isinstance(r, DeliveryError) else None for r in results]
                answers = [r.excerpt if isinstance(r, DeliveryError) else r.response_excerpt for r in results]
            else:
                if len(batch) > 1 and isinstance(sink, DigestSink):
                    attempt = await sink.deliver_digest(events, Counter(d.type for d in batch))
                else:
                    attempt = await sink.deliver(events)
                status = attempt.status
                errors, answers = [None] * len(batch), [attempt.response_excerpt] * len(batch)
        except DeliveryError as exc:
            status = exc.status
            errors, answers = [exc] * len(batch), [exc.excerpt] * len(batch)
        except asyncio.CancelledError:
            # Cut off by a stop or a reload after its grace (_drain): the receiver may have read
            # the request, so it is a row in the attempt log, and the event goes again.
            interrupted = Interrupted(STOPPED)
            errors, answers = [interrupted] * len(batch), [""] * len(batch)
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled: the record below must not count as cancelled
        except Exception as exc:  # a bug in a sink must not lose the event: it is retried like a failure
            log.exception("sink raised an unexpected error", sink=sink.name)
            internal = DeliveryError(f"internal error: {type(exc).__name__}")
            errors, answers = [internal] * len(batch), [""] * len(batch)
        duration = round(self.clock.monotonic() - started, 4)
        now = self.clock.now()
        outcomes = [
            decide(d, error, now=now, sink=sink, rng=self.rng, excerpt=attempt_excerpt(answer))
            for d, error, answer in zip(batch, errors, answers, strict=True)
        ]
        if lane.passing is not None:
            began = lane.passing.began
            lane.passing.again.update(o.seq for o in outcomes if o.status == PENDING and o.next_attempt_at <= began)
        # Taken: the slot goes to the next event while this outcome waits to be committed with
        # others; until then the deliveries stay busy (pending in the file). A failure keeps
        # its slot until recorded, so a pause or a disable it brings stops the next send.
        this = asyncio.current_task()
        freed = False
        for d, error in zip(batch, errors, strict=True):
            if error is None and lane.in_flight.pop(d.seq, None) is not None and this is not None:
                lane.recording[d.seq] = this
                freed = True
        if freed:
            lane.kick.set()
        # One record per distinct error (one in all but a pipelined attempt that was partly taken).
        groups: dict[int, tuple[DeliveryError | None, list[Due], list[Outcome]]] = {}
        for d, error, outcome in zip(batch, errors, outcomes, strict=True):
            group = groups.setdefault(id(error), (error, [], []))
            group[1].append(d)
            group[2].append(outcome)
        taken = 0
        for error, dues, outs in groups.values():
            code = status if error is None else error.status
            try:
                await self._recorder.record(Recorded(sink.name, tuple(outs), now, code, duration, error is None))
            except WatcherError as exc:
                # Nothing was written: the file still says pending. Keep the outcome and write it when
                # the file accepts it, rather than send a delivered event again every few seconds.
                self.write_error = str(exc)[:300]
                lane.unwritten.append(Unwritten(dues, outs, error, code, duration, now))
                log.error(
                    "cannot record a delivery outcome; kept in memory and written when the state file accepts it",
                    sink=sink.name,
                    error=self.write_error,
                )
                lane.held_until = max(lane.held_until, self.clock.monotonic() + ERROR_BACKOFF)
                continue
            self._after(lane, dues, outs, error, code, duration)
            if error is None:
                taken += len(dues)
        return taken

    def _after(
        self,
        lane: Lane,
        batch: Sequence[Due],
        outcomes: Sequence[Outcome],
        error: DeliveryError | None,
        status: int | None,
        duration: float,
    ) -> None:
        sink = lane.sink
        if any(o.status != PENDING for o in outcomes):
            lane.rewind = True  # a later event about the same resource, already passed by the reads, is free now
        if error is None:
            # Taken: counted for the summary line, and a line each only when debug is on (a
            # pipelined broker sink confirms thousands a second; building lines nobody reads costs).
            if self.metrics is not None:
                for _ in batch:
                    self.metrics.delivery(sink.name, "success")
            self.tally.add_many(sink.name, Counter(d.type for d in batch), duration, self.clock.monotonic())
            if _debug.isEnabledFor(logging.DEBUG):
                for due, outcome in zip(batch, outcomes, strict=True):
                    log.debug(
                        "delivered",
                        sink=sink.name,
                        event_id=due.event_id,
                        type=due.type,
                        attempt=outcome.attempt or outcome.attempts,
                        status=status,
                        duration=duration,
                        outcome="success",
                    )
        else:
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
                    attempt=outcome.attempt or outcome.attempts,
                    status=status,
                    duration=duration,
                    outcome=kind,
                )
                if outcome.status == DEAD:
                    log.error("delivery dead: schedule or max_age exhausted", error=outcome.error, **fields)
                else:
                    retry_at = outcome.next_attempt_at
                    log.warning("delivery failed", error=outcome.error, next_attempt_at=retry_at, **fields)
        pause = pause_for(error)
        if pause > 0:
            # On the URL's pace: every sink posting to the same hook holds back, not only this one.
            lane.pace.paused_until = max(lane.pace.paused_until, self.clock.monotonic() + pause)
            log.warning("receiver asked to slow down; sink paused", sink=sink.name, seconds=round(pause, 3))
        if isinstance(error, SinkGone):
            if not lane.disabled:
                lane.disabled = True
                self.store.disable_sink(sink.name, self.clock.now(), str(error)[:500])
                log.error(
                    "sink disabled: the receiver says it will never accept these events; they stay queued "
                    "until the sink is enabled again (change its config, or `replay --sink`)",
                    sink=sink.name,
                    status=status,
                    reason=str(error)[:200],
                )
        elif error is not None:
            self._alert_if_failing(lane)

    def _alert_if_failing(self, lane: Lane) -> None:
        now = self.clock.now()
        since = self.store.failing_since(lane.sink.name)
        if since is None:
            return
        if now - since >= FAILING_ALERT_AFTER and now - lane.last_alert >= 600:
            lane.last_alert = now
            log.error("sink failing without a success", sink=lane.sink.name, failing_for=round(now - since))

    # --- `once` -------------------------------------------------------------------------------

    async def deliver_due_once(self, producing: Callable[[], bool] = lambda: False) -> PassResult:
        """Attempt every due delivery once (in per-resource order) on the same lanes `run` uses;
        report what happened. While `producing()` holds, events committed meanwhile join the
        pass (call `wake()` when it stops holding), so a backfill's deliveries overlap its walk.
        """
        stopping = asyncio.Event()
        began = self.clock.now()
        lanes = list(self._lanes.values())
        for lane in lanes:
            lane.passing = Pass(began, producing)
        try:
            # A lane ends its pass with nothing in flight, unless an error broke it: then what is in
            # flight gets the sink's timeout to finish.
            await asyncio.gather(*(self._worker(lane, stopping, lane.sink.config.timeout) for lane in lanes))
        finally:
            self._recorder.flush()
            results = [lane.passing.result for lane in lanes if lane.passing is not None]
            for lane in lanes:
                lane.passing = None
            say(self.tally, self.clock.monotonic(), force=True)
        total = PassResult()
        for r in results:
            total.attempted += r.attempted
            total.delivered += r.delivered
            total.failed += r.failed
            total.broken += r.broken
        return total
