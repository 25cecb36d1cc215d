"""Attacks on the 8 December changes (pipelined PostgreSQL writes, stored bodies, the poller's memory).

Each test here failed against the code as it was merged, and names the fault it pins.
Real PostgreSQL, the real store (`open_postgres`), a second session as the other writer.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.support.leaders import another_hosts_lease
from tests.support.postgres import Database
from watcher.config import PostgresState
from watcher.errors import StateError
from watcher.events import Event
from watcher.lease import LeaseTimings
from watcher.records import PageCommit
from watcher.state.postgres import PostgresStore, open_postgres

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
