"""The dispatcher: pure `decide`/`batches` tables, then real runs over a store (SQLite and PostgreSQL) and
loopback receivers."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.support.backends import Backend, state_of
from tests.support.daemon import WEBHOOK_KEY, wait_until
from tests.support.receiver import FakeSlack, Receiver, Reply, Request
from watcher import __version__
from watcher.clock import FakeClock, SystemClock, rfc3339
from watcher.config import SinkConfig, StateConfig
from watcher.delivery.dispatcher import Dispatcher
from watcher.delivery.lane import PassResult
from watcher.delivery.policy import batches, decide, pause_for
from watcher.errors import DeliveryError, SinkGone, Throttled
from watcher.events import LEAD_CREATED, LEAD_UPDATED, Event, event_id
from watcher.records import CampaignState, PageCommit
from watcher.sinks import build_sink
from watcher.sinks.base import Sink
from watcher.state.admin import Selection
from watcher.state.records import DEAD, DELIVERED, PENDING, Due, Outcome
from watcher.state.store import Store, open_store

NOW = 1_800_000_000.0

# --- pure tables ------------------------------------------------------------------------------


@dataclass
class Shape:
    """Just what `decide` and `batches` read of a sink."""

    config: SinkConfig
    max_batch: int = 1
    min_interval: float = 0.0
    name: str = "crm"

    async def deliver(self, events: Sequence[Event]) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def shape(**kw: Any) -> Sink:
    batch = kw.pop("max_batch", 1)
    interval = kw.pop("min_interval", 0.0)
    return Shape(SinkConfig(name="crm", type="webhook", url="http://127.0.0.1:9/", **kw), batch, interval)


def due(seq: int = 1, attempts: int = 0, created_at: float = NOW, resource: str = "lead:1") -> Due:
    return Due(seq, "crm", f"evt_{seq}", LEAD_CREATED, resource, 601, "{}", attempts, created_at)


SCHEDULE = (10.0, 100.0)


@pytest.mark.parametrize(
    ("d", "error", "sink", "status", "attempts", "logged", "next_at"),
    [
        pytest.param(due(), None, shape(), DELIVERED, 1, 1, (NOW, NOW), id="2xx delivers"),
        pytest.param(due(attempts=2), None, shape(), DELIVERED, 3, 3, (NOW, NOW), id="late success"),
        pytest.param(
            due(),
            DeliveryError("HTTP 500"),
            shape(retry_schedule=SCHEDULE),
            PENDING,
            1,
            1,
            (NOW + 8, NOW + 12),
            id="first failure waits the first step +-20%",
        ),
        pytest.param(
            due(attempts=1),
            DeliveryError("x"),
            shape(retry_schedule=SCHEDULE),
            PENDING,
            2,
            2,
            (NOW + 80, NOW + 120),
            id="second failure waits the second step",
        ),
        pytest.param(
            due(attempts=2),
            DeliveryError("x"),
            shape(retry_schedule=SCHEDULE),
            DEAD,
            3,
            3,
            (NOW, NOW),
            id="schedule used up: dead",
        ),
        pytest.param(
            due(created_at=NOW - 95),
            DeliveryError("x"),
            shape(retry_schedule=SCHEDULE, max_age=100.0),
            DEAD,
            1,
            1,
            (NOW, NOW),
            id="next try would pass max_age: dead",
        ),
        pytest.param(
            due(),
            Throttled("429", status=429, retry_after=60.0),
            shape(retry_schedule=SCHEDULE),
            PENDING,
            1,
            1,
            (NOW + 60, NOW + 60),
            id="Retry-After raises the wait",
        ),
        pytest.param(
            due(),
            Throttled("429", status=429, retry_after=1.0),
            shape(retry_schedule=SCHEDULE),
            PENDING,
            1,
            1,
            (NOW + 8, NOW + 12),
            id="Retry-After never shortens the schedule",
        ),
        pytest.param(
            due(),
            Throttled("429", status=429, retry_after=86_400.0),
            shape(retry_schedule=SCHEDULE),
            PENDING,
            1,
            1,
            (NOW + 3600, NOW + 3600),
            id="Retry-After capped at an hour for short steps",
        ),
        pytest.param(
            due(attempts=3),
            SinkGone("HTTP 410", status=410),
            shape(),
            PENDING,
            3,
            4,
            (NOW, NOW),
            id="gone: kept pending, schedule untouched, attempt still logged",
        ),
    ],
)
def test_decide(
    d: Due,
    error: DeliveryError | None,
    sink: Sink,
    status: str,
    attempts: int,
    logged: int,
    next_at: tuple[float, float],
) -> None:
    """An attempt's error and the sink's schedule decide the delivery's state, count and next time."""
    out = decide(d, error, now=NOW, sink=sink, rng=random.Random(5))
    assert (out.status, out.attempts, out.logged_attempt) == (status, attempts, logged)
    assert next_at[0] <= out.next_attempt_at <= next_at[1]
    asked = "" if error is None or error.retry_after is None else f" (receiver asked to wait {error.retry_after:g} s)"
    assert out.error == (None if error is None else str(error) + asked)


def test_decide_keeps_a_short_last_error() -> None:
    """The stored last error is cut to 500 characters."""
    out = decide(due(), DeliveryError("x" * 2000), now=NOW, sink=shape(), rng=random.Random(1))
    assert out.error is not None and len(out.error) == 500


@pytest.mark.parametrize(
    ("n", "max_batch", "min_interval", "groups"),
    [
        (5, 1, 0.0, [1, 1, 1, 1, 1]),  # webhooks: one event per request
        (3, 20, 1.0, [1, 1, 1]),  # a paced sink with no more than three seconds' worth: singles
        (4, 20, 1.0, [4]),  # more than that: one digest
        (30, 20, 1.0, [30]),  # a digest takes the whole burst; only a sample of it is listed
        (10, 20, 0.0, [1] * 10),  # batching needs pacing: an unpaced sink never digests
    ],
)
def test_batches(n: int, max_batch: int, min_interval: float, groups: list[int]) -> None:
    """Due events go out singly unless a paced sink faces a burst, which becomes one digest."""
    rows = [due(seq=i, resource=f"lead:{i}") for i in range(n)]
    got = batches(rows, shape(max_batch=max_batch, min_interval=min_interval))
    assert [len(g) for g in got] == groups
    assert [d.seq for g in got for d in g] == [r.seq for r in rows][: sum(groups)]


@dataclass
class PipedShape(Shape):
    """A sink that takes several events per attempt, an outcome each (the broker sinks)."""

    async def deliver_each(self, events: Sequence[Event]) -> Any:
        raise NotImplementedError


@pytest.mark.parametrize(
    ("n", "max_batch", "groups"),
    [
        (70, 32, [32, 32, 6]),  # a pipelined sink: groups of up to its batch, in seq order
        (1, 32, [1]),  # one due event goes at once, alone: nothing waits for a group to fill
        (5, 1, [1] * 5),  # a batch of one is a single
    ],
)
def test_batches_of_a_pipelined_sink(n: int, max_batch: int, groups: list[int]) -> None:
    """Unpaced, a pipelined sink's due events go in groups of up to max_batch, each seq once, in order."""
    rows = [due(seq=i, resource=f"lead:{i}") for i in range(n)]
    sink = PipedShape(SinkConfig(name="crm", type="nats", url="nats://127.0.0.1:4222", subject="s"), max_batch)
    got = batches(rows, sink)
    assert [len(g) for g in got] == groups
    assert [d.seq for g in got for d in g] == [r.seq for r in rows]


@pytest.mark.parametrize(
    ("error", "pause"),
    [
        (None, 0.0),
        (DeliveryError("HTTP 500", status=500, retry_after=30.0), 0.0),
        (Throttled("429", status=429), 0.0),
        (Throttled("429", status=429, retry_after=2.5), 2.5),
        (Throttled("429", status=429, retry_after=10 * 86_400.0), 3600.0),
    ],
)
def test_pause_for(error: DeliveryError | None, pause: float) -> None:
    """Only a throttle that names its wait holds back the whole sink, for at most an hour."""
    assert pause_for(error) == pause


# --- the store's view of what is due ----------------------------------------------------------


def _event(n: int, resource: str = "lead:1", type_: str = LEAD_CREATED) -> Event:
    lead = int(resource.split(":")[1])
    return Event(
        id=event_id(type_, resource, str(n)),
        type=type_,
        timestamp=rfc3339(NOW + n),
        data={
            "lead": {"id": lead, "campaign": "/api/v4/campaigns/601", "email": f"person{lead}@example.org"},
            **({"changes": {"score": {"from": n, "to": n + 1}}} if type_ == LEAD_UPDATED else {}),
        },
        resource=resource,
        campaign_id=601,
    )


def queue(store: Store, events: Sequence[Event], sinks: Sequence[str] = ("crm",), now: float | None = None) -> None:
    store.commit_page(
        PageCommit("leads.created", time.time() if now is None else now, events=[(e, sinks) for e in events])
    )


def test_next_due_at_looks_only_at_the_head_of_each_resource(backend: Backend) -> None:
    """A later event scheduled earlier cannot go first, so it does not make the worker wake early."""
    store = backend.open()
    try:
        queue(store, [_event(1, "lead:1"), _event(2, "lead:1"), _event(3, "lead:2")], now=NOW)
        first, other = store.due("crm", NOW, 10)
        store.record_outcomes(
            "crm",
            [Outcome(first.seq, first.event_id, PENDING, 1, NOW + 100, "x")],
            now=NOW,
            status_code=500,
            duration=0.0,
            success=False,
        )
        # evt 2 is due at NOW, but waits behind evt 1 (NOW + 100); evt 3 is due at NOW.
        assert store.next_due_at("crm") == NOW
        assert store.next_due_at("crm", frozenset({other.seq})) == NOW + 100
        assert store.next_due_at("elsewhere") is None
    finally:
        store.close()


# --- a running dispatcher ---------------------------------------------------------------------


def webhook(url: str, name: str = "crm", **kw: Any) -> SinkConfig:
    kw.setdefault("secrets", (WEBHOOK_KEY,))
    kw.setdefault("timeout", 5.0)
    kw.setdefault("retry_schedule", (0.05,) * 20)
    return SinkConfig(name=name, type="webhook", url=url, **kw)


def slack(url: str, name: str = "team", **kw: Any) -> SinkConfig:
    kw.setdefault("include_pii", False)
    kw.setdefault("concurrency", 1)
    kw.setdefault("timeout", 5.0)
    return SinkConfig(name=name, type="slack", url=url, **kw)


class Running:
    """`Dispatcher.run` in its own thread and event loop, on its own connection to the state file."""

    def __init__(self, state: StateConfig, configs: Sequence[SinkConfig], *, grace: float = 5.0) -> None:
        self.state = state
        self.configs = list(configs)
        self.grace = grace
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._dispatcher: Dispatcher | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="dispatcher", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # surfaced by stop()
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        clock = SystemClock()
        store = open_store(self.state)
        sinks = [build_sink(c, clock=clock, version=__version__) for c in self.configs]
        try:
            self._dispatcher = Dispatcher(store, sinks, clock, rng=random.Random(3))
            self._dispatcher.sync_sinks({c.name: "fingerprint" for c in self.configs})
            self._stopping = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await self._dispatcher.run(self._stopping, grace=self.grace)
        finally:
            for sink in sinks:
                await sink.aclose()
            store.close()

    def __enter__(self) -> Running:
        self._thread.start()
        assert self._ready.wait(10), "dispatcher did not start"
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread.is_alive():
            self.stop()

    def wake(self) -> None:
        assert self._loop is not None and self._dispatcher is not None
        self._loop.call_soon_threadsafe(self._dispatcher.wake)

    def stop(self) -> float:
        """Stop the dispatcher; seconds it took to return."""
        started = time.monotonic()
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "dispatcher did not stop"
        if self._error is not None:
            raise self._error
        return time.monotonic() - started


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = backend.open()
    yield s
    s.close()


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def settled(store: Store, sink: str = "crm") -> bool:
    rows = store.deliveries(sink)
    return bool(rows) and all(r["status"] != PENDING for r in rows)


def order_kept(requests: Sequence[Request], seq_of: dict[str, int], resource_of: dict[str, str]) -> bool:
    """No request for an event arrives before the last request for an earlier event of its resource."""
    last_seen: dict[str, int] = {}
    for r in requests:
        eid = r.headers["webhook-id"]
        res = resource_of[eid]
        if seq_of[eid] < last_seen.get(res, -1):
            return False
        last_seen[res] = seq_of[eid]
    return True


def test_failures_then_success_keep_per_resource_order_and_ids(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """A receiver failing for a while gets everything, each resource in detection order, with stable ids."""
    rx.respond_sequence([500] * 6)
    events = [_event(n, f"lead:{1 + n % 3}") for n in range(9)]
    queue(store, events)
    with Running(state_of(store), [webhook(rx.url, concurrency=4)]):
        wait_until(lambda: settled(store), 15, "every delivery settled")
    assert {d["status"] for d in store.deliveries()} == {DELIVERED}
    accepted = [r.headers["webhook-id"] for r in rx.requests if r.status == 200]
    assert sorted(accepted) == sorted(e.id for e in events), "each event accepted exactly once"
    seq_of = {e.id: i for i, e in enumerate(events)}
    resource_of = {e.id: e.resource for e in events}
    assert order_kept(rx.requests, seq_of, resource_of)
    bodies = {r.headers["webhook-id"]: r.body for r in rx.requests}
    assert all(r.body == bodies[r.headers["webhook-id"]] for r in rx.requests), "a retry sends the same body"
    assert len(rx.verified_events(WEBHOOK_KEY)) == len(rx.requests)


def test_every_attempt_is_logged(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """Each request leaves one attempt row: sink, event id, attempt number, status, duration and error."""
    rx.respond_sequence([500, 503, Reply(429, headers={"retry-after": "0"})])
    queue(store, [_event(1)])
    with Running(state_of(store), [webhook(rx.url)]):
        wait_until(lambda: settled(store), 10, "delivered")
    log = store.attempts("crm")
    assert [(a["sink"], a["attempt"], a["status_code"]) for a in log] == [
        ("crm", 1, 500),
        ("crm", 2, 503),
        ("crm", 3, 429),
        ("crm", 4, 200),
    ]
    assert {a["event_id"] for a in log} == {_event(1).id}
    assert all(a["duration"] >= 0 for a in log)
    assert [a["error"] is None for a in log] == [False, False, False, True]
    assert "HTTP 500" in log[0]["error"] and "HTTP 429" in log[2]["error"]
    assert [r.status for r in rx.requests] == [500, 503, 429, 200]


def test_unrelated_events_go_concurrently_up_to_the_bound(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """With the receiver holding requests, exactly `concurrency` heads of distinct resources are in flight."""
    events = [_event(0, "lead:1"), _event(1, "lead:1"), *(_event(n, f"lead:{n}") for n in range(2, 7))]
    queue(store, events)
    rx.hang()
    with Running(state_of(store), [webhook(rx.url, concurrency=3)]):
        held = rx.wait_for_count(3, 10)
        assert {r.headers["webhook-id"] for r in held} == {events[0].id, events[2].id, events[3].id}
        rx.hang(False)
        wait_until(lambda: settled(store), 10, "delivered")
    assert len(rx.requests) == len(events)
    assert order_kept(rx.requests, {e.id: i for i, e in enumerate(events)}, {e.id: e.resource for e in events})


def test_retry_after_pauses_the_whole_sink(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """After a 429 with Retry-After, no request of any event reaches the receiver before the wait is over."""
    rx.respond_sequence([Reply(429, headers={"retry-after": "1"})])
    queue(store, [_event(1, "lead:1"), _event(2, "lead:2")])
    with Running(state_of(store), [webhook(rx.url, concurrency=1)]):
        wait_until(lambda: settled(store), 10, "delivered")
    first, second, third = rx.requests
    assert first.status == 429
    assert second.received_at - first.received_at >= 1.0
    assert {second.status, third.status} == {200}


def test_410_disables_the_sink_until_another_process_enables_it(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """410 disables the sink and keeps its events untouched; `replay --sink` from elsewhere sends them in order."""
    rx.respond(410)
    events = [_event(n, "lead:1") for n in range(3)] + [_event(3, "lead:2")]
    queue(store, events)
    with Running(state_of(store), [webhook(rx.url, concurrency=2)]):
        wait_until(lambda: store.sink_state("crm").disabled_at is not None, 10, "sink disabled")
        # Attempts already in flight when the first 410 came back may still finish; then all is quiet.
        wait_until(lambda: len(store.attempts("crm")) == len(rx.requests), 10, "attempts in flight recorded")
        refused = len(rx.requests)
        state = store.sink_state("crm")
        assert (state.pending, state.dead, state.delivered) == (4, 0, 0)
        assert all(d["attempts"] == 0 for d in store.deliveries("crm")), "the events' schedules are untouched"
        assert "HTTP 410" in (state.disabled_reason or "")
        rx.respond(200)
        assert store.replay(time.time(), Selection(sinks=["crm"])) == 0  # nothing dead; it only re-enables the sink
        wait_until(lambda: settled(store), 10, "backlog delivered after re-enabling")
    assert 1 <= refused <= 2, "at most the attempts already in flight"
    delivered = [r.headers["webhook-id"] for r in rx.requests if r.status == 200]
    lead1 = [e.id for e in events[:3]]
    assert [i for i in delivered if i in lead1] == lead1
    assert [a["attempt"] for a in store.attempts("crm") if a["status_code"] == 410] == [1] * refused


def test_hung_sink_never_delays_another(tmp_path: Path, store: Store) -> None:
    """While one receiver holds every request, the other sink delivers its whole queue within 3 s."""
    with Receiver() as hung, Receiver() as healthy:
        hung.hang()
        ids = [e.id for e in (_event(n, f"lead:{n}") for n in range(20))]
        queue(store, [_event(n, f"lead:{n}") for n in range(20)], sinks=("stuck", "ok"))
        started = time.monotonic()
        with Running(
            state_of(store),
            [webhook(hung.url, "stuck", timeout=20.0, concurrency=4), webhook(healthy.url, "ok")],
            grace=0.5,
        ) as d:
            wait_until(lambda: settled(store, "ok"), 3, "the healthy sink's whole queue within 3 s")
            took = time.monotonic() - started
            held = hung.wait_for_count(4)
            assert len(held) == 4 and all(r.status is None for r in held), "the other sink is still hung"
            stopped_in = d.stop()
        assert sorted(r.headers["webhook-id"] for r in healthy.requests) == sorted(ids)
        assert took < 3.0
        assert stopped_in < 3.0, "stopping gives hung attempts only the grace period"
        stuck = store.deliveries("stuck")
        assert all(d["status"] == PENDING and d["attempts"] == 0 for d in stuck), "interrupted: sent again later"


def test_stop_lets_an_attempt_in_flight_finish(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """Stopping while a slow receiver answers waits for the answer and records the delivery."""
    rx.respond(200, delay=0.3)
    queue(store, [_event(1)])
    with Running(state_of(store), [webhook(rx.url)]) as d:
        rx.wait_for_count(1)
        d.stop()
    assert [x["status"] for x in store.deliveries("crm")] == [DELIVERED]


def test_max_age_makes_a_failing_event_dead_and_unblocks_the_next(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """An event still failing when max_age runs out is dead with its last error; the next one then goes."""
    rx.respond(500)
    first, second = _event(1, "lead:1"), _event(2, "lead:1")
    queue(store, [first, second])
    with Running(state_of(store), [webhook(rx.url, max_age=0.4, retry_schedule=(0.1,) * 50)]):
        wait_until(lambda: settled(store), 10, "both dead")
    rows = {d["event_id"]: d for d in store.deliveries("crm")}
    assert {r["status"] for r in rows.values()} == {DEAD}
    assert rows[first.id]["last_error"] == "HTTP 500 Internal Server Error"
    assert rows[first.id]["attempts"] >= 2
    ids = [r.headers["webhook-id"] for r in rx.requests]
    assert ids.index(second.id) > len(ids) - 1 - ids[::-1].index(first.id), "the second waited for the first"
    assert store.sink_state("crm").dead == 2


def test_schedule_exhausted_is_dead(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """One first try plus one per schedule step, then dead."""
    rx.respond(502)
    queue(store, [_event(1)])
    with Running(state_of(store), [webhook(rx.url, retry_schedule=(0.05, 0.05))]):
        wait_until(lambda: settled(store), 10, "dead")
    [row] = store.deliveries("crm")
    assert (row["status"], row["attempts"]) == (DEAD, 3)
    assert len(rx.requests) == 3


def test_slack_burst_becomes_paced_digests(tmp_path: Path, store: Store) -> None:
    """Thirty queued events reach Slack as one digest counting all thirty and listing a sample of twenty ids."""
    events = [_event(n, f"lead:{n}") for n in range(30)]
    queue(store, events, sinks=("team",))
    with FakeSlack() as fake, Running(state_of(store), [slack(fake.url)]):
        wait_until(lambda: settled(store, "team"), 10, "all delivered")
        messages = fake.messages()
    assert len(messages) == 1
    text = "".join(str(m["blocks"]) for m in messages)
    assert sum(text.count(e.id) for e in events) == 20 and "…and 10 more not listed" in text
    assert messages[0]["text"].startswith("30 Convertr changes")
    assert "example.org" not in text


def test_two_sinks_posting_to_one_slack_hook_share_its_pace(tmp_path: Path, store: Store) -> None:
    """Slack limits a hook, not a sink: two sinks with the same URL together send at most once a second."""
    queue(store, [_event(1, "lead:1")], sinks=("team",))
    queue(store, [_event(2, "lead:2")], sinks=("other",))
    with FakeSlack() as fake, Running(state_of(store), [slack(fake.url), slack(fake.url, "other")]):
        wait_until(lambda: settled(store, "team") and settled(store, "other"), 10, "both delivered")
        first, second = fake.arrival_times()
    assert second - first >= 0.9


# --- `once` -----------------------------------------------------------------------------------


def once(state: StateConfig, configs: Sequence[SinkConfig], clock: FakeClock) -> PassResult:
    async def main() -> PassResult:
        store = open_store(state)
        sinks = [build_sink(c, clock=clock, version=__version__, campaign_names=store.campaign_names) for c in configs]
        try:
            dispatcher = Dispatcher(store, sinks, clock, rng=random.Random(1))
            dispatcher.sync_sinks({c.name: "fingerprint" for c in configs})
            return await dispatcher.deliver_due_once()
        finally:
            for s in sinks:
                await s.aclose()
            store.close()

    return asyncio.run(main())


def test_once_attempts_each_due_delivery_once_in_order(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """One pass sends a resource's events in order while they succeed, and stops at its first failure."""
    clock = FakeClock(NOW)
    rx.respond_sequence([200, 500])
    queue(store, [_event(0, "lead:1"), _event(1, "lead:1"), _event(2, "lead:1")], now=NOW)
    result = once(state_of(store), [webhook(rx.url, concurrency=1)], clock)
    assert (result.attempted, result.delivered, result.failed) == (2, 1, 1)
    assert [d["status"] for d in store.deliveries("crm")] == [DELIVERED, PENDING, PENDING]
    clock.advance(1)
    result = once(state_of(store), [webhook(rx.url, concurrency=1)], clock)
    assert (result.attempted, result.delivered, result.failed) == (2, 2, 0)


def test_once_paces_slack_and_stops_a_throttled_sink(tmp_path: Path, store: Store) -> None:
    """A pass waits a second between Slack messages, and leaves a sink alone once it says Retry-After."""
    clock = FakeClock(NOW)
    queue(store, [_event(1, "lead:1"), _event(2, "lead:2")], sinks=("team",), now=NOW)
    with FakeSlack() as fake:
        result = once(state_of(store), [slack(fake.url)], clock)
        assert (result.attempted, result.delivered) == (2, 2)
        assert any(s >= 0.99 for s in clock.slept), "the second message waited for the first second to pass"
        queue(store, [_event(3, "lead:3"), _event(4, "lead:4")], sinks=("team",), now=clock.now())
        fake.respond_sequence([Reply(429, b"rate_limited", {"retry-after": "30"})])
        result = once(state_of(store), [slack(fake.url)], clock)
        assert (result.attempted, result.failed) == (1, 1)
        assert len(fake.messages()) == 3


def test_disabled_sink_is_skipped_by_once(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """A sink disabled in the state file is not attempted by a pass."""
    queue(store, [_event(1)], now=NOW)
    store.sync_sink("crm", "fingerprint")
    store.disable_sink("crm", NOW, "HTTP 410 Gone")
    result = once(state_of(store), [webhook(rx.url)], FakeClock(NOW))
    assert result == PassResult()
    assert rx.requests == []


def test_updated_event_type_is_carried(tmp_path: Path, store: Store, rx: Receiver) -> None:
    """The stored type and body go out as detected (a lead.updated stays one)."""
    queue(store, [_event(1, "lead:1", LEAD_UPDATED)], now=NOW)
    once(state_of(store), [webhook(rx.url)], FakeClock(NOW))
    [body] = rx.verified_events(WEBHOOK_KEY, check_timestamp=False)
    assert body["type"] == LEAD_UPDATED


def test_slack_messages_about_a_lead_name_its_campaign(tmp_path: Path, store: Store) -> None:
    """A lead only links its campaign; the Slack message names it from the watcher's campaign records."""
    store.commit_page(PageCommit("campaigns", NOW, campaigns=[CampaignState(601, "Active", 0, "Spring & Co")]))
    queue(store, [_event(1, "lead:1")], sinks=("team",), now=NOW)
    with FakeSlack() as hook:
        once(state_of(store), [slack(hook.url)], FakeClock(NOW))
        [message] = hook.messages()
    assert "Spring &amp; Co (601)" in str(message["blocks"])
