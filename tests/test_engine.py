"""The dispatch engine on the injected clock: a scripted in-memory sink and a real SQLite store, no
sockets and no real waiting, so pacing, passes and retries are exact."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from watcher.clock import FakeClock, rfc3339
from watcher.config import SinkConfig
from watcher.delivery.dispatcher import SWEEP_INTERVAL, Dispatcher
from watcher.delivery.lane import PassResult
from watcher.errors import DeliveryError, StateError, Throttled
from watcher.events import LEAD_CREATED, LEAD_UPDATED, Event, event_id
from watcher.records import PageCommit
from watcher.sinks.base import Attempt
from watcher.state.records import DELIVERED, Due, Outcome
from watcher.state.store import Store

NOW = 1_800_000_000.0


@dataclass
class ScriptedSink:
    """A sink whose answers come from a script and whose sends take time on the fake clock."""

    config: SinkConfig
    clock: FakeClock
    answer: Callable[[Event, int], DeliveryError | None] = lambda event, n: None
    takes: float = 0.0
    max_batch: int = 1
    min_interval: float = 0.0
    got: list[Event] = field(default_factory=list)
    tries: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    peak: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    async def deliver(self, events: Sequence[Event]) -> Attempt:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.clock.sleep(self.takes)
            await asyncio.sleep(0)  # let every other started attempt run up to here too
            event = events[0]
            n = self.tries[event.id] = self.tries.get(event.id, 0) + 1
            error = self.answer(event, n)
            if error is not None:
                raise error
            self.got.extend(events)
            return Attempt(status=204, duration=self.takes, response_excerpt="")
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        pass


def sink_config(**kw: object) -> SinkConfig:
    return SinkConfig(name="crm", type="webhook", url="http://127.0.0.1:9/", **kw)  # type: ignore[arg-type]


def lead_events(leads: range, kind: str = LEAD_CREATED, version: str = "") -> list[Event]:
    return [
        Event(event_id(kind, f"lead:{i}", version), kind, rfc3339(NOW), {"lead": {"id": i}}, f"lead:{i}", 1)
        for i in leads
    ]


def commit(store: Store, events: list[Event], sink: str = "crm") -> None:
    store.commit_page(PageCommit("leads.created", NOW, events=[(e, [sink]) for e in events]))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "state.db")
    yield s  # type: ignore[misc]
    s.close()


def run_pass(dispatcher: Dispatcher, producing: Callable[[], bool] = lambda: False) -> PassResult:
    return asyncio.run(dispatcher.deliver_due_once(producing))


def test_a_pass_sends_each_event_once_in_order_per_lead_up_to_the_concurrency(store: Store) -> None:
    """Thirty events about five leads: each sent once, each lead's in detection order, four at a time."""
    clock = FakeClock(NOW)
    for version in ("", "v2", "v3"):
        kind = LEAD_CREATED if not version else LEAD_UPDATED
        commit(store, lead_events(range(5), kind, version) + lead_events(range(10, 15), kind, version))
    sink = ScriptedSink(sink_config(concurrency=4), clock, takes=0.05)
    result = run_pass(Dispatcher(store, [sink], clock))
    assert result == PassResult(attempted=30, delivered=30, failed=0)
    assert len({e.id for e in sink.got}) == 30
    for lead in [*range(5), *range(10, 15)]:
        kinds = [e.type for e in sink.got if e.resource == f"lead:{lead}"]
        assert kinds == [LEAD_CREATED, LEAD_UPDATED, LEAD_UPDATED]
    assert sink.peak == 4


def test_a_pass_tries_a_failing_event_once_even_when_its_retry_falls_due_at_once(store: Store) -> None:
    """A zero retry step on a clock that stands still makes a failed event due again: the pass still tries it once."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(3)))
    sink = ScriptedSink(sink_config(retry_schedule=(0.0, 0.0)), clock, answer=lambda e, n: DeliveryError("HTTP 500"))
    result = run_pass(Dispatcher(store, [sink], clock, rng=random.Random(1)))
    assert result == PassResult(attempted=3, delivered=0, failed=3)
    assert sink.tries == {e.id: 1 for e in lead_events(range(3))}


def test_a_pass_leaves_a_retry_for_the_next_pass(store: Store) -> None:
    """A failed event waits for its schedule: the next pass, once it is due, sends it; the first pass did not."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(2)))
    sink = ScriptedSink(
        sink_config(retry_schedule=(60.0,)), clock, answer=lambda e, n: DeliveryError("HTTP 500") if n == 1 else None
    )
    dispatcher = Dispatcher(store, [sink], clock, rng=random.Random(1))

    async def three_passes() -> list[PassResult]:
        first, second = await dispatcher.deliver_due_once(), await dispatcher.deliver_due_once()
        clock.advance(75)
        return [first, second, await dispatcher.deliver_due_once()]

    assert asyncio.run(three_passes()) == [
        PassResult(attempted=2, delivered=0, failed=2),
        PassResult(),
        PassResult(attempted=2, delivered=2, failed=0),
    ]


def test_events_committed_while_the_pass_runs_join_it(store: Store) -> None:
    """A backfill's later pages, committed while the pass delivers its first, go out in the same pass."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(5)))
    pages = [lead_events(range(100 * p, 100 * p + 5)) for p in range(1, 4)]
    sink = ScriptedSink(sink_config(concurrency=2), clock, takes=0.01)
    dispatcher = Dispatcher(store, [sink], clock)

    async def main() -> PassResult:
        producing = True

        async def poll() -> None:
            nonlocal producing
            for page in pages:
                await asyncio.sleep(0.01)
                commit(store, page)
                dispatcher.wake()
            producing = False
            dispatcher.wake()

        polls = asyncio.create_task(poll())
        result = await dispatcher.deliver_due_once(lambda: producing)
        await polls
        return result

    result = asyncio.run(main())
    assert result == PassResult(attempted=20, delivered=20, failed=0)
    assert {e.id for e in sink.got} == {e.id for e in lead_events(range(5)) + [e for p in pages for e in p]}


def test_a_throttled_sink_is_left_for_the_rest_of_the_pass(store: Store) -> None:
    """A receiver asking to wait pauses its sink: the pass stops sending to it and the events stay queued."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(10)))
    sink = ScriptedSink(
        sink_config(concurrency=1), clock, answer=lambda e, n: Throttled("HTTP 429", status=429, retry_after=30.0)
    )
    result = run_pass(Dispatcher(store, [sink], clock, rng=random.Random(1)))
    assert result == PassResult(attempted=1, delivered=0, failed=1)
    assert store.sink_states(["crm"])[0].pending == 10


def test_a_paced_sink_sends_a_backfill_as_one_digest_without_waiting_for_it_to_settle(store: Store) -> None:
    """Once its polls are done a pass has seen the whole burst: a paced sink digests it at once."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(40)))
    sink = ScriptedSink(sink_config(concurrency=1), clock, max_batch=20, min_interval=1.0)
    sent: list[int] = []

    async def digest(sample: Sequence[Event], counts: dict[str, int]) -> Attempt:
        sent.append(sum(counts.values()))
        return Attempt(status=200, duration=0.0, response_excerpt="")

    sink.deliver_digest = digest  # type: ignore[attr-defined]
    result = run_pass(Dispatcher(store, [sink], clock))
    assert result == PassResult(attempted=40, delivered=40, failed=0)
    assert sent == [40]
    assert clock.slept == []  # no settle or pace wait before the only message


def test_run_waits_for_a_retry_on_the_injected_clock(store: Store) -> None:
    """The daemon's workers wait for a retry on the injected clock: a minute passes on it, not in real time."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(1)))
    sink = ScriptedSink(
        sink_config(retry_schedule=(60.0,)), clock, answer=lambda e, n: DeliveryError("HTTP 500") if n == 1 else None
    )
    dispatcher = Dispatcher(store, [sink], clock, rng=random.Random(1))

    async def main() -> None:
        stopping = asyncio.Event()
        worker = asyncio.create_task(dispatcher.run(stopping))
        async with asyncio.timeout(10):
            while not sink.got:
                await asyncio.sleep(0.001)
        stopping.set()
        await worker

    asyncio.run(main())
    assert sink.tries == {sink.got[0].id: 2}
    assert clock.now() - NOW >= 48  # the 60 s step, less its 20 % jitter
    assert [d["status"] for d in store.deliveries()] == [DELIVERED]


def _vm_steps(store: Store, read: Callable[[], object]) -> int:
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    store.conn.set_progress_handler(count, 1)
    try:
        read()
    finally:
        store.conn.set_progress_handler(None, 1)
    return steps


def test_claiming_and_recording_cost_the_same_with_a_long_queue(store: Store, tmp_path: Path) -> None:
    """SQLite work to read the next due deliveries and record an outcome does not grow with the queue behind them."""
    short = Store.open(tmp_path / "short.db")
    for s, n in ((short, 200), (store, 20_000)):
        for start in range(0, n, 1000):
            commit(s, lead_events(range(start, start + 1000)))
    costs = []
    for s in (short, store):
        # Halfway through the queue, as a reader that has been delivering for a while is.
        middle = s.due("crm", NOW, 1, after=len(s.deliveries()) // 2)[0].seq
        read = _vm_steps(s, lambda s=s, m=middle: s.due("crm", NOW, 64, after=m))  # type: ignore[misc]
        first = s.due("crm", NOW, 1, after=middle)[0]
        record = _vm_steps(
            s,
            lambda s=s, d=first: s.record_outcomes(  # type: ignore[misc]
                "crm",
                [Outcome(d.seq, d.event_id, DELIVERED, 1, NOW, None)],
                now=NOW,
                status_code=204,
                duration=0.01,
                success=True,
            ),
        )
        costs.append((read, record))
    short.close()
    (short_read, short_record), (long_read, long_record) = costs
    assert long_read <= 1.2 * short_read
    assert long_record <= 1.2 * short_record


def test_a_digest_never_overtakes_an_event_that_failed_earlier_in_the_pass(store: Store) -> None:
    """A lead's creation failed in the pass and falls due again in it: its update stays queued, out of any digest."""
    clock = FakeClock(NOW)
    created = lead_events(range(1))[0]
    updated = lead_events(range(1), LEAD_UPDATED, "v2")[0]
    commit(store, [created])
    sink = ScriptedSink(
        sink_config(concurrency=1, retry_schedule=(1.0,)),
        clock,
        max_batch=20,
        min_interval=1.0,
        answer=lambda e, n: DeliveryError("HTTP 500") if e.id == created.id else None,
    )
    digested: list[str] = []

    async def digest(sample: Sequence[Event], counts: dict[str, int]) -> Attempt:
        digested.extend(e.id for e in sample)
        return Attempt(status=200, duration=0.0, response_excerpt="")

    sink.deliver_digest = digest  # type: ignore[attr-defined]
    dispatcher = Dispatcher(store, [sink], clock, rng=random.Random(1))

    async def main() -> None:
        producing = True

        async def poll() -> None:
            nonlocal producing
            while not sink.tries:  # the first page has been tried (and failed)
                await asyncio.sleep(0.001)
            commit(store, [updated, *lead_events(range(1, 8))])
            dispatcher.wake()
            await asyncio.sleep(0.05)
            producing = False
            dispatcher.wake()

        polls = asyncio.create_task(poll())
        await dispatcher.deliver_due_once(lambda: producing)
        await polls

    asyncio.run(main())
    assert len(digested) == 7 and updated.id not in digested
    status = {d["event_id"]: d["status"] for d in store.deliveries()}
    assert status[created.id] == status[updated.id] == "pending"


def test_a_lead_forgotten_while_read_ahead_is_not_sent(store: Store) -> None:
    """`forget` from another process erases a lead the lane has already read ahead: it is never sent or logged."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(10)))
    gate = asyncio.Event()
    started: list[str] = []

    class Gated(ScriptedSink):
        async def deliver(self, events: Sequence[Event]) -> Attempt:
            started.append(events[0].resource)
            await gate.wait()
            return await super().deliver(events)

    sink = Gated(sink_config(concurrency=1), clock)
    dispatcher = Dispatcher(store, [sink], clock)

    async def main() -> None:
        stopping = asyncio.Event()
        worker = asyncio.create_task(dispatcher.run(stopping, grace=1))
        async with asyncio.timeout(10):
            while not started:  # lead 0 in flight, the rest read ahead
                await asyncio.sleep(0.001)
        other = Store.open(store.path)  # the `forget` command's own connection
        assert other.forget(5, NOW)["events"] == 1
        other.close()
        gate.set()
        async with asyncio.timeout(10):
            while len(sink.got) < 9:
                await asyncio.sleep(0.001)
        stopping.set()
        await worker

    asyncio.run(main())
    assert [e.resource for e in sink.got] == [f"lead:{i}" for i in range(10) if i != 5]
    assert [a for a in store.attempts() if a["event_id"] == lead_events(range(5, 6))[0].id] == []


def test_a_pass_whose_state_file_refuses_reads_ends_and_says_so(store: Store) -> None:
    """An error reading the queue ends the sink's pass as broken (once exits 1) instead of retrying it forever."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(3)))

    class Refusing(Store):
        def due(self, *args: object, **kwargs: object) -> list[Due]:
            raise StateError("cannot read state file: disk I/O error")

    refusing = Refusing(store.conn, store.path)
    sink = ScriptedSink(sink_config(), clock)

    async def main() -> PassResult:
        async with asyncio.timeout(10):
            return await Dispatcher(refusing, [sink], clock).deliver_due_once()

    assert asyncio.run(main()) == PassResult(broken=1)
    assert sink.got == []


def test_a_reload_while_the_disk_refuses_writes_sends_nothing_twice(store: Store) -> None:
    """Outcomes the state file refused survive a reload: the rebuilt lane writes them rather than send again."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(3)))

    class Refusing(Store):
        refusing = True

        def transaction(self) -> Iterator[sqlite3.Connection]:  # type: ignore[override]
            if self.refusing:
                raise StateError("cannot write state file: database or disk is full")
            return super().transaction()

    refusing = Refusing(store.conn, store.path)
    sent: list[str] = []

    def taken(event: Event, n: int) -> None:
        sent.append(event.id)  # and answered 2xx

    def build(config: SinkConfig) -> ScriptedSink:
        return ScriptedSink(config, clock, answer=taken)

    dispatcher = Dispatcher(refusing, [build(sink_config(concurrency=4))], clock)

    async def main() -> None:
        stopping = asyncio.Event()
        worker = asyncio.create_task(dispatcher.run(stopping))
        async with asyncio.timeout(10):
            while len(sent) < 3:
                await asyncio.sleep(0.001)
        await dispatcher.reconfigure([sink_config(concurrency=5)], build)
        await asyncio.sleep(0.1)
        refusing.refusing = False
        async with asyncio.timeout(20):
            while store.sink_states(["crm"])[0].pending:
                await asyncio.sleep(0.01)
        stopping.set()
        await worker

    asyncio.run(main())
    assert sorted(sent) == sorted(e.id for e in lead_events(range(3)))


def test_a_retry_and_the_event_it_frees_wait_at_most_a_sweep_behind_a_backlog(store: Store) -> None:
    """A retry falling due, and the event it frees, go out within about a sweep, not behind the read-ahead."""
    clock = FakeClock(NOW)
    created = lead_events(range(1))[0]
    updated = lead_events(range(1), LEAD_UPDATED, "v2")[0]
    commit(store, [created, updated])
    commit(store, lead_events(range(1, 400)))  # other leads' backlog, behind them
    takes = 0.1
    sink = ScriptedSink(
        sink_config(concurrency=1, retry_schedule=(0.3,)),
        clock,
        takes=takes,
        answer=lambda e, n: DeliveryError("HTTP 500") if e.id == created.id and n == 1 else None,
    )
    dispatcher = Dispatcher(store, [sink], clock, rng=random.Random(1))

    async def main() -> None:
        stopping = asyncio.Event()
        worker = asyncio.create_task(dispatcher.run(stopping))
        async with asyncio.timeout(20):
            while updated not in sink.got:
                await asyncio.sleep(0.001)
        stopping.set()
        await worker

    asyncio.run(main())
    order = [e.id for e in sink.got]
    # The retry is due 0.36 s (0.3 s + 20 % jitter) after the first attempt, which was the first send.
    due_after = int(0.36 / takes) + 1
    a_sweep = int(SWEEP_INTERVAL / takes) + 2
    assert order.index(created.id) - due_after <= a_sweep
    assert order.index(updated.id) - order.index(created.id) - 1 <= a_sweep
