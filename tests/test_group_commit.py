"""Group commit of delivery outcomes: many finished attempts in one transaction, a send's slot
freed before its outcome is committed, and nothing of the per-resource order given up for it.

The engine on the injected clock with a real SQLite store and the scripted sink of test_engine."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_engine import NOW, ScriptedSink, commit, lead_events, sink_config

from watcher.clock import FakeClock
from watcher.delivery.dispatcher import Dispatcher
from watcher.delivery.recorder import GROUP_LIMIT
from watcher.events import LEAD_CREATED, LEAD_UPDATED, Event
from watcher.sinks.base import Attempt
from watcher.state.records import DELIVERED, PENDING, Recorded
from watcher.state.store import Store


class CountingStore(Store):
    """The real store, counting the transactions that record attempts and the outcomes in each."""

    groups: list[int]

    def record_attempts(self, attempts: Sequence[Recorded]) -> None:
        super().record_attempts(attempts)
        self.groups.append(sum(len(a.outcomes) for a in attempts))


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    s = CountingStore.open(tmp_path / "state.db")
    assert isinstance(s, CountingStore)
    s.groups = []
    yield s  # type: ignore[misc]
    s.close()


def run_until_delivered(store: Store, dispatcher: Dispatcher, count: int) -> None:
    async def main() -> None:
        stopping = asyncio.Event()
        worker = asyncio.create_task(dispatcher.run(stopping))
        async with asyncio.timeout(30):
            while store.sink_states(["crm"])[0].delivered < count:
                await asyncio.sleep(0.01)
        stopping.set()
        await worker

    asyncio.run(main())


def test_a_stream_of_confirmations_is_recorded_in_few_transactions(store: CountingStore) -> None:
    """600 events confirmed as fast as they go out: outcomes share transactions, each written once."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(600)))
    sink = ScriptedSink(sink_config(concurrency=8), clock)
    run_until_delivered(store, Dispatcher(store, [sink], clock), 600)
    assert sum(store.groups) == 600  # every outcome written, none twice
    assert len(store.groups) <= 600 // 20  # one transaction per loop turn wrote about 8 each
    assert max(store.groups) <= GROUP_LIMIT + 8  # a full group is written at the turn it fills
    assert len({e.id for e in sink.got}) == 600 == len(sink.got)


def test_a_confirmed_send_frees_its_slot_before_its_outcome_is_committed(store: CountingStore) -> None:
    """With one slot, the next event goes out while the last one's outcome waits for company."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(3)))
    seen: list[str | None] = []  # at each send, the file's status of the event sent before it

    class Checking(ScriptedSink):
        async def deliver(self, events: Sequence[Event]) -> Attempt:
            if self.got:
                rows = [d for d in store.deliveries() if d["event_id"] == self.got[-1].id]
                seen.append(rows[0]["status"])
            return await super().deliver(events)

    sink = Checking(sink_config(concurrency=1), clock)
    run_until_delivered(store, Dispatcher(store, [sink], clock), 3)
    assert seen == [PENDING, PENDING]
    assert [d["status"] for d in store.deliveries()] == [DELIVERED] * 3


def test_a_lead_s_next_event_waits_for_the_commit_of_the_one_before(store: CountingStore) -> None:
    """Order per lead holds under group commit: an update never goes out before the creation's
    outcome is in the file, however many other leads' events share the transactions."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(50)))
    commit(store, lead_events(range(50), LEAD_UPDATED, "v2"))
    order: list[tuple[str, str]] = []  # (event type, the file's status of the lead's creation when sent)

    class Checking(ScriptedSink):
        async def deliver(self, events: Sequence[Event]) -> Attempt:
            event = events[0]
            if event.type == LEAD_UPDATED:
                created = [
                    d["status"]
                    for d in store.deliveries()
                    if d["resource"] == event.resource and d["type"] == LEAD_CREATED
                ]
                order.append((event.resource, created[0]))
            return await super().deliver(events)

    sink = Checking(sink_config(concurrency=8), clock)
    run_until_delivered(store, Dispatcher(store, [sink], clock), 100)
    assert len(order) == 50
    assert all(status == DELIVERED for _, status in order)
    for lead in range(50):
        kinds = [e.type for e in sink.got if e.resource == f"lead:{lead}"]
        assert kinds == [LEAD_CREATED, LEAD_UPDATED]


def test_an_outcome_is_not_held_for_a_full_group_when_sends_take_longer_than_the_window(
    store: CountingStore,
) -> None:
    """While other sends go on, an outcome is written once the group window has passed on the
    injected clock (checked as the next attempt ends), not held until the group is full."""
    clock = FakeClock(NOW)
    commit(store, lead_events(range(30)))
    sink = ScriptedSink(sink_config(concurrency=4), clock, takes=0.05)  # beyond the 20 ms window
    run_until_delivered(store, Dispatcher(store, [sink], clock), 30)
    assert sum(store.groups) == 30
    assert max(store.groups) <= 2 * 4  # the attempts of at most two rounds of sends
