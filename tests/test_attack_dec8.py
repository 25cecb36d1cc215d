"""Attacks on the 8 December changes (pipelined PostgreSQL writes, stored bodies, the poller's memory).

Each test here failed against the code as it was merged, and names the fault it pins.
Real PostgreSQL, the real store (`open_postgres`), a second session as the other writer.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from tests.support import brokers
from tests.support.brokers import AMQP_URL, headers_of
from tests.support.leaders import another_hosts_lease
from tests.support.postgres import Database
from watcher.clock import SystemClock
from watcher.config import PostgresState, SinkConfig
from watcher.delivery.stored import stored_event
from watcher.errors import DeliveryError, StateError
from watcher.events import Event, dumps
from watcher.lease import LeaseTimings
from watcher.records import PageCommit
from watcher.sinks import build_sink
from watcher.sinks.base import Attempt
from watcher.sinks.broker import BrokerSink
from watcher.state.postgres import PostgresStore, open_postgres
from watcher.state.records import Due

SCHEMA = "convertr_attack"
TIMINGS = LeaseTimings(3.0)  # op_timeout 1 s: a write waiting longer for the writer lock is refused


def _event(n: int) -> Event:
    return Event(
        id=f"evt_{n:032x}",
        type="lead.created",
        timestamp="2026-12-08T00:00:00Z",
        data={"id": n},
        resource=f"lead:{n}",
    )


class _Pages:
    """A leader's store committing one page after another, each with one new event."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.n = 0

    def commit(self) -> list[Event]:
        self.n += 1
        page = PageCommit("created", float(self.n), cursor=f"c{self.n}", events=[(_event(self.n), ["crm"])])
        return self.store.commit_page(page)


def test_a_leaders_store_writes_again_after_two_writes_refused_mid_pipeline(postgres_db: Database) -> None:
    """A write refused while another writer (a `forget`, a `replay`) held the state's writer lock past
    op_timeout aborts the pipeline: the statements after the refused one are skipped by the server.
    psycopg had counted some of them as prepared at that moment (their fifth run), and the ROLLBACK
    sent as a plain statement left its cache believing so (only psycopg's rollback() forgets them, and
    only the connection's first ROLLBACK statement happened to). After a second such refusal every
    later write of the term failed with 'prepared statement "_pg3_N" does not exist': the leader kept
    its lease and never committed a page or an outcome again."""
    another_hosts_lease(postgres_db.url, SCHEMA)  # epoch 4 leads
    state = PostgresState(
        url=postgres_db.url,
        host=postgres_db.server.host,
        port=postgres_db.server.port,
        dbname=postgres_db.name,
        schema=SCHEMA,
    )
    store = open_postgres(state, fence_epoch=lambda: 4, timings=TIMINGS, member="attack")
    other = psycopg.connect(postgres_db.url)
    try:
        pages = _Pages(store)

        def refused_while_locked() -> None:
            other.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"watcher-state:{SCHEMA}",))
            try:
                with pytest.raises(StateError):
                    pages.commit()
            finally:
                other.rollback()

        refused_while_locked()
        for _ in range(5):
            assert len(pages.commit()) == 1
        refused_while_locked()
        for _ in range(5):
            assert len(pages.commit()) == 1  # raised StateError: prepared statement "_pg3_…" does not exist
        with psycopg.connect(postgres_db.url) as check:
            query = f"SELECT count(*) FROM {SCHEMA}.events JOIN {SCHEMA}.deliveries ON event_seq = seq"
            found = check.execute(query).fetchone()
        assert found is not None and found[0] == 10
    finally:
        other.close()
        store.close()


def test_a_corrupt_stored_payload_fails_only_its_own_event_in_a_broker_batch_without_pii() -> None:
    """A sink that strips personal fields decodes each stored envelope (delivery.stored) inside the
    attempt, since the bodies became lazy: one payload that no longer decodes (a damaged row) raised
    out of the whole batch's publishing, so every event of the attempt failed with it, each counting
    an attempt, and the good ones went dead with the damaged one. Only that event may fail."""
    brokers.require(5672, "RabbitMQ")
    good = [_event(1), _event(2)]
    dues = [
        Due(1, "rabbit", good[0].id, good[0].type, good[0].resource, None, dumps(good[0].envelope()), 0, 0.0),
        Due(2, "rabbit", "evt_" + "d" * 32, "lead.created", "lead:99", None, '{"type":"lead.created","timest', 0, 0.0),
        Due(3, "rabbit", good[1].id, good[1].type, good[1].resource, None, dumps(good[1].envelope()), 0, 0.0),
    ]
    with brokers.rabbit() as mq:
        config = SinkConfig("rabbit", "amqp", AMQP_URL, exchange=mq.exchange, include_pii=False)

        async def attempt() -> list[Attempt | DeliveryError]:
            sink = build_sink(config, clock=SystemClock(), version="test")
            assert isinstance(sink, BrokerSink)
            try:
                return await sink.deliver_each([stored_event(d) for d in dues])
            finally:
                await sink.aclose()

        results = asyncio.run(attempt())
        assert [isinstance(r, Attempt) for r in results] == [True, False, True], results
        assert sorted(headers_of(m)["webhook-id"] for m in mq.messages()) == sorted(e.id for e in good)
