"""The state: migrations, one-transaction page commits, due ordering, replay and pruning.

Tests taking `store` or `backend` run on SQLite and on PostgreSQL (tests/support/backends.py);
those about the file itself (WAL, PRAGMAs, a replaced file) are SQLite's alone, and PostgreSQL's
own (its schema version, schemas side by side, fencing) follow them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.backends import Backend
from tests.support.daemon import wait_until
from tests.support.postgres import Database
from watcher.errors import Deposed, StateError, StateTooNew
from watcher.events import Event
from watcher.leadership import leadership_ddl
from watcher.records import CampaignState, LeadState, PageCommit
from watcher.state.admin import Selection
from watcher.state.migrations import MIGRATIONS
from watcher.state.records import DEAD, DELIVERED, PENDING, Outcome
from watcher.state.store import Store, open_store


def _event(n: int, resource: str = "lead:1") -> Event:
    return Event(id=f"evt_{n}", type="lead.created", timestamp="t", data={"n": n}, resource=resource)


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = backend.open()
    yield s
    s.close()


def test_open_sets_wal_and_schema_version(tmp_path: Path) -> None:
    """A new file is in WAL mode at the newest schema version, and reopening is a no-op."""
    Store.open(tmp_path / "s.db").close()
    s = Store.open(tmp_path / "s.db")
    # Raw on purpose: the journal mode and schema version are the file's header, this test's subject.
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    s.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer release is not touched."""
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path)  # raw on purpose: no Store writes a newer release's file
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StateError, match="newer than this release"):
        Store.open(path)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    """Opening a state file in a folder that does not exist names the folder."""
    with pytest.raises(StateError, match="does not exist"):
        Store.open(tmp_path / "nope" / "s.db")


def test_commit_page_is_idempotent_per_event_id(store: Store) -> None:
    """Committing the same change twice keeps one event and one delivery per sink."""
    page = PageCommit("leads.created", 100.0, cursor="c1", cursor_ts=1.0, events=[(_event(1), ["a", "b"])])
    assert [e.id for e in store.commit_page(page)] == ["evt_1"]
    again = PageCommit("leads.created", 101.0, cursor="c2", cursor_ts=2.0, events=[(_event(1), ["a", "b"])])
    assert store.commit_page(again) == []
    assert len(store.deliveries()) == 2
    cursor = store.cursor("leads.created")
    assert cursor is not None and cursor.cursor == "c2"


def test_failed_commit_moves_nothing(store: Store) -> None:
    """When a page's transaction fails, neither the cursor nor any row moves."""
    store.commit_page(PageCommit("s", 1.0, cursor="before", cursor_ts=1.0))
    bad = PageCommit(
        "s",
        2.0,
        cursor="after",
        cursor_ts=2.0,
        leads=[LeadState(1, 1.0, None, {}), LeadState(2, 1.0, None, {"x": object()})],  # not JSON
        events=[(_event(9), ["a"])],
    )
    with pytest.raises(TypeError):
        store.commit_page(bad)
    cursor = store.cursor("s")
    assert cursor is not None and cursor.cursor == "before"
    assert store.leads([1, 2]) == {}
    assert store.deliveries() == []


def test_due_keeps_resource_order(store: Store) -> None:
    """A later event about the same resource waits until the earlier one is delivered or dead."""
    store.commit_page(
        PageCommit(
            "s",
            10.0,
            events=[(_event(1, "lead:1"), ["a"]), (_event(2, "lead:1"), ["a"]), (_event(3, "lead:2"), ["a"])],
        )
    )
    due = store.due("a", 10.0, 10)
    assert [d.event_id for d in due] == ["evt_1", "evt_3"]
    store.record_outcomes(
        "a",
        [Outcome(due[0].seq, "evt_1", DEAD, 1, 10.0, "x")],
        now=10.0,
        status_code=500,
        duration=0.1,
        success=False,
    )
    assert [d.event_id for d in store.due("a", 10.0, 10)] == ["evt_2", "evt_3"]
    assert [d.event_id for d in store.due("a", 10.0, 10, busy=frozenset({due[1].seq}))] == ["evt_2"]


def test_due_respects_next_attempt_time(store: Store) -> None:
    """A delivery scheduled for later is not due yet."""
    store.commit_page(PageCommit("s", 10.0, events=[(_event(1), ["a"])]))
    seq = store.due("a", 10.0, 1)[0].seq
    store.record_outcomes(
        "a",
        [Outcome(seq, "evt_1", PENDING, 1, 50.0, "boom")],
        now=10.0,
        status_code=500,
        duration=0.1,
        success=False,
    )
    assert store.due("a", 49.0, 10) == []
    assert store.next_due_at("a") == 50.0
    assert [d.attempts for d in store.due("a", 50.0, 10)] == [1]


def test_replay_by_sink_id_and_time(store: Store) -> None:
    """Dead deliveries are re-queued by sink, by event id and by detection time; ids are kept."""
    store.commit_page(PageCommit("s", 10.0, events=[(_event(1, "lead:1"), ["a", "b"])]))
    store.commit_page(PageCommit("s", 20.0, events=[(_event(2, "lead:2"), ["a"])]))
    for sink in ("a", "b"):
        for d in store.due(sink, 30.0, 10):
            store.record_outcomes(
                sink,
                [Outcome(d.seq, d.event_id, DEAD, 9, 30.0, "gone")],
                now=30.0,
                status_code=500,
                duration=0.0,
                success=False,
            )
    assert store.replay(40.0, Selection(sinks=["b"])) == 1
    assert store.replay(40.0, Selection(event_ids=["evt_2"])) == 1
    assert store.replay(40.0, Selection(since=5.0, until=15.0)) == 1  # evt_1 on sink a
    assert {(d["sink"], d["event_id"], d["status"]) for d in store.deliveries()} == {
        ("a", "evt_1", PENDING),
        ("b", "evt_1", PENDING),
        ("a", "evt_2", PENDING),
    }
    assert all(d["attempts"] == 0 for d in store.deliveries())


def test_prune_drops_old_delivered_rows_and_snapshots(store: Store) -> None:
    """Delivered rows, attempts and stale snapshots past their retention are removed."""
    store.commit_page(PageCommit("s", 0.0, leads=[LeadState(1, 0.0, None, {"a": 1})], events=[(_event(1), ["a"])]))
    seq = store.due("a", 0.0, 1)[0].seq
    store.record_outcomes(
        "a",
        [Outcome(seq, "evt_1", DELIVERED, 1, 0.0, None)],
        now=0.0,
        status_code=200,
        duration=0.1,
        success=True,
    )
    counts = store.prune(1000.0, delivered_retention=500, attempt_retention=500, snapshot_retention=500)
    assert counts == {"deliveries": 1, "attempts": 1, "snapshots": 1}
    assert store.events() == []
    assert store.integrity_check() == "ok"


def test_disabled_sink_reenabled_by_config_change(store: Store) -> None:
    """A disabled sink stays disabled until its configuration changes."""
    assert store.sync_sink("a", "f1") is False
    store.disable_sink("a", 1.0, "410")
    assert store.sync_sink("a", "f1") is True
    assert store.sync_sink("a", "f2") is False


def test_migrations_run_by_version(tmp_path: Path) -> None:
    """A file left at schema version 1 is brought forward step by step, keeping its rows."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)  # raw on purpose: a version-1 file, with a row in version 1's columns
    conn.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO campaigns (id, status, transitions, seen_at) VALUES (601, 'Active', 2, 0)")
    conn.commit()
    conn.close()
    store = Store.open(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 2
    assert store.campaigns()[601].transitions == 2
    store.commit_page(PageCommit("campaigns", 1.0, campaigns=[CampaignState(601, "Paused", 3, "Q1")]))
    assert store.campaign_names() == {601: "Q1"}
    store.close()


def _store_with_one_failed_delivery(
    backend: Backend, asked: bool, retry_at: float, name: str = "state.db"
) -> tuple[Store, int]:
    from watcher.events import Event
    from watcher.records import PageCommit
    from watcher.state.records import ASKED_TO_WAIT, Outcome

    store = backend.open(name)
    event = Event("evt_a", "lead.created", "t", {"lead": {"id": 1}}, "lead:1", campaign_id=601)
    store.commit_page(PageCommit("leads.created", 0.0, events=[(event, ["old"])]))
    [due] = store.due("old", 1.0, 10)
    store.record_outcomes(
        "old",
        [Outcome(due.seq, due.event_id, "pending", 1, retry_at, f"refused ({ASKED_TO_WAIT} 9 s)" if asked else "no",
                 asked_to_wait=asked)],
        now=10.0, status_code=503,
        duration=0.1, success=False,
    )  # fmt: skip
    return store, due.seq


def test_a_wait_the_receiver_asked_for_survives_a_new_retry_schedule(backend: Backend) -> None:
    """Re-timing on a shorter schedule pulls a plain failure's retry in, but never a wait the receiver asked for."""
    store, _ = _store_with_one_failed_delivery(backend, True, 310.0)
    assert store.reschedule("old", [3.0]) == 0
    assert store.deliveries("old")[0]["next_attempt_at"] == 310.0
    store.close()
    store, _ = _store_with_one_failed_delivery(backend, False, 310.0, "other.db")
    assert store.reschedule("old", [3.0]) == 1
    assert store.deliveries("old")[0]["next_attempt_at"] == 13.0
    store.close()


def test_reschedule_reads_the_asked_wait_from_its_column_not_the_error_text(backend: Backend) -> None:
    """The Retry-After flag is the deliveries row's column: an error that merely reads like one is shortened,
    a flagged wait whose text says nothing of it is kept."""
    from watcher.records import PageCommit
    from watcher.state.records import ASKED_TO_WAIT, Outcome

    store = backend.open()
    events = [Event(f"evt_{n}", "lead.created", "t", {"lead": {"id": n}}, f"lead:{n}") for n in (1, 2)]
    store.commit_page(PageCommit("leads.created", 0.0, events=[(e, ["s"]) for e in events]))
    first, second = store.due("s", 1.0, 10)
    store.record_outcomes(
        "s",
        [
            Outcome(first.seq, first.event_id, "pending", 1, 310.0, f"a receiver quoting ({ASKED_TO_WAIT} 9 s)"),
            Outcome(second.seq, second.event_id, "pending", 1, 310.0, "refused", asked_to_wait=True),
        ],
        now=10.0,
        status_code=503,
        duration=0.1,
        success=False,
    )
    assert store.reschedule("s", [3.0]) == 1
    assert {d["event_id"]: d["next_attempt_at"] for d in store.deliveries("s")} == {"evt_1": 13.0, "evt_2": 310.0}
    store.close()


def test_a_file_from_before_the_asked_wait_column_upgrades_and_keeps_its_waits(tmp_path: Path) -> None:
    """A schema-6 file (the flag only in the error text) opens, gains the column from the waiting
    deliveries' errors, and keeps working: a re-timing keeps the asked wait and pulls a plain one in."""
    import sqlite3

    path = tmp_path / "state.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        for script in MIGRATIONS[:6]:
            conn.executescript(script)
        conn.execute("PRAGMA user_version = 6")
        conn.executescript(
            """
            INSERT INTO events (seq, id, type, resource, payload, detected_at) VALUES
              (1, 'evt_1', 'lead.created', 'lead:1', '{"timestamp": "t", "data": {}}', 0),
              (2, 'evt_2', 'lead.created', 'lead:2', '{"timestamp": "t", "data": {}}', 0);
            INSERT INTO deliveries (event_seq, sink, resource, status, attempts, next_attempt_at, last_error,
                                    created_at) VALUES
              (1, 's', 'lead:1', 'pending', 1, 310, 'HTTP 503 (receiver asked to wait 300 s)', 0),
              (2, 's', 'lead:2', 'pending', 1, 310, 'HTTP 503', 0);
            INSERT INTO attempts (sink, event_id, attempt, status_code, duration, error, at, resource) VALUES
              ('s', 'evt_1', 1, 503, 0.1, 'HTTP 503 (receiver asked to wait 300 s)', 10, 'lead:1'),
              ('s', 'evt_2', 1, 503, 0.1, 'HTTP 503', 10, 'lead:2');
            """
        )
    conn.close()
    store = Store.open(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert store.reschedule("s", [3.0]) == 1
    assert {d["event_id"]: d["next_attempt_at"] for d in store.deliveries("s")} == {"evt_1": 310.0, "evt_2": 13.0}
    assert [d.event_id for d in store.due("s", 20.0, 10)] == ["evt_2"]
    store.close()


def test_moving_a_queue_takes_only_what_the_new_sink_accepts(backend: Backend) -> None:
    """`replay --from-sink` hands over only events the new sink's own filters accept; the rest stay put."""
    store, _ = _store_with_one_failed_delivery(backend, False, 50.0)
    assert store.move_sink("old", "new", 20.0, lambda event: event.campaign_id == 602) == (0, 1)
    assert store.move_sink("old", "new", 20.0, lambda event: event.campaign_id == 601) == (1, 0)
    assert [d["sink"] for d in store.deliveries()] == ["new"]
    store.close()


def test_a_file_replaced_under_an_open_store_never_gets_its_wal(tmp_path: Path) -> None:
    """An older copy moved over the file while a reader holds the WAL (so the close cannot fold it in): the next
    open sees the copy alone, not the copy with the old file's WAL applied to it."""
    path = tmp_path / "state.db"
    store = Store.open(path)
    store.commit_page(PageCommit("leads.created", 1.0, cursor="copied", cursor_ts=1.0, finished=True))
    with closing(sqlite3.connect(tmp_path / "older.db")) as copy:
        store.conn.backup(copy)
    for n in range(20):
        store.commit_page(PageCommit("leads.created", 2.0 + n, cursor=f"after-{n}", cursor_ts=2.0 + n, finished=True))
    with closing(sqlite3.connect(path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM cursors").fetchone()  # a `status` mid-read holds the WAL
        (tmp_path / "older.db").replace(path)
        assert store.replaced()
        store.close()
    again = Store.open(path)
    try:
        cursor = again.cursor("leads.created")
        assert cursor is not None and cursor.cursor == "copied"
        again.verify()
    finally:
        again.close()


# ------------------------------------------------------------------------------ PostgreSQL's own


def _pg(postgres_db: Database, tmp_path: Path) -> Backend:
    return Backend("postgresql", tmp_path, postgres_db)


def _schema(backend: Backend, name: str = "state.db") -> str:
    pg = backend.state(name).postgres
    assert pg is not None
    return pg.schema


def test_postgresql_state_is_versioned_in_its_schema_and_a_newer_one_is_refused(
    postgres_db: Database, tmp_path: Path
) -> None:
    """The schema records its version in state_meta (SQLite's user_version), reopening changes nothing,
    and a version from a newer release is refused by the daemon's open and by `status`'s."""
    backend = _pg(postgres_db, tmp_path)
    backend.open().close()
    backend.open().close()
    schema = _schema(backend)
    with psycopg.connect(postgres_db.url, autocommit=True) as conn:  # raw on purpose: the schema's header
        assert conn.execute(f"SELECT version FROM {schema}.state_meta").fetchall() == [(len(MIGRATIONS),)]
        conn.execute(f"UPDATE {schema}.state_meta SET version = version + 1")
    with pytest.raises(StateTooNew, match="newer than this release"):
        backend.open()
    with pytest.raises(StateTooNew, match="needs a newer convertr-watcher"):
        backend.open_readonly()


def test_postgresql_status_never_creates_a_state(postgres_db: Database, tmp_path: Path) -> None:
    """Opening for reading where no daemon has run says so, and leaves no schema behind."""
    backend = _pg(postgres_db, tmp_path)
    with pytest.raises(StateError, match="no state in postgresql://"):
        backend.open_readonly()
    with psycopg.connect(postgres_db.url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (_schema(backend),)).fetchone() == (
            0,
        )


def test_enterprises_share_a_database_each_in_its_own_schema(postgres_db: Database, tmp_path: Path) -> None:
    """Two states in one database (two schemas) keep their own cursors, outboxes and seqs, and a write
    transaction held open on one does not block the other."""
    backend = _pg(postgres_db, tmp_path)
    a, b = backend.open("acme.db"), backend.open("globex.db")
    try:
        a.commit_page(PageCommit("leads.created", 1.0, cursor="a1", cursor_ts=1.0, events=[(_event(1), ["crm"])]))
        b.commit_page(PageCommit("leads.created", 1.0, cursor="b1", cursor_ts=1.0))
        with a.transaction():  # acme's writer lock held...
            b.commit_page(PageCommit("leads.created", 2.0, cursor="b2", cursor_ts=2.0, events=[(_event(2), ["crm"])]))
        assert [d["event_id"] for d in a.deliveries()] == ["evt_1"]
        assert [d["event_id"] for d in b.deliveries()] == ["evt_2"]
        assert (a.cursor("leads.created") or _none()).cursor == "a1"
        assert (b.cursor("leads.created") or _none()).cursor == "b2"
    finally:
        a.close()
        b.close()


def _none() -> Any:
    raise AssertionError("no cursor")


def test_postgresql_outside_writes_counts_other_connections_commits_only(postgres_db: Database, tmp_path: Path) -> None:
    """What the dispatcher re-reads on: another process's commit (a replay) changes it, its own do not."""
    backend = _pg(postgres_db, tmp_path)
    daemon, operator = backend.open(), backend.open()
    try:
        seen = daemon.outside_writes()
        daemon.commit_page(PageCommit("s", 1.0, events=[(_event(1), ["a"])]))
        assert daemon.outside_writes() == seen
        operator.replay(2.0, Selection(sinks=["a"]))
        # Told by the replay's NOTIFY, which reaches the daemon's idle session just after the commit.
        wait_until(lambda: daemon.outside_writes() != seen, 5, "the replay's commit noticed")
    finally:
        daemon.close()
        operator.close()


def _lease(postgres_db: Database, schema: str, epoch: int) -> None:
    """The lease row as a takeover leaves it: `epoch` leads now (raw on purpose: no second daemon needed)."""
    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        for statement in leadership_ddl(schema):
            conn.execute(statement)
        conn.execute(
            f"INSERT INTO {schema}.leadership (name, epoch, holder, host, pid, since, renewed_at, expires_at) "
            "VALUES ('leader', %s, 'other', 'host-b', 1, now(), now(), now() + interval '1 minute') "
            "ON CONFLICT (name) DO UPDATE SET epoch = EXCLUDED.epoch, holder = EXCLUDED.holder",
            (epoch,),
        )


def test_a_deposed_leaders_store_commits_nothing(postgres_db: Database, tmp_path: Path) -> None:
    """A store opened with a fence writes while its epoch leads; once another epoch leads (a standby took
    over), its commit_page raises Deposed and neither the cursor, nor a snapshot, nor an outbox row moves."""
    backend = _pg(postgres_db, tmp_path)
    schema = _schema(backend)
    _lease(postgres_db, schema, 1)
    leading: list[int | None] = [1]
    store = open_store(backend.state(), fence_epoch=lambda: leading[0])
    observer = backend.open_readonly()
    try:
        store.commit_page(PageCommit("leads.created", 1.0, cursor="c1", cursor_ts=1.0, events=[(_event(1), ["a"])]))
        _lease(postgres_db, schema, 2)  # a standby took over
        page = PageCommit(
            "leads.created",
            2.0,
            cursor="c2",
            cursor_ts=2.0,
            leads=[LeadState(5, 2.0, None, {"a": 1})],
            events=[(_event(2, "lead:5"), ["a"])],
        )
        with pytest.raises(Deposed, match="epoch 2, this daemon led epoch 1"):
            store.commit_page(page)
        with pytest.raises(Deposed):
            store.record_outcomes("a", [], now=3.0, status_code=200, duration=0.1, success=True)
        leading[0] = None  # the runtime knows it no longer leads: refused before asking the database
        with pytest.raises(Deposed, match="does not lead"):
            store.commit_page(page)
        assert (observer.cursor("leads.created") or _none()).cursor == "c1"
        assert observer.leads([5]) == {}
        assert [d["event_id"] for d in observer.deliveries()] == ["evt_1"]
        leading[0] = 2  # led again (a later epoch): writes go through
        assert [e.id for e in store.commit_page(page)] == ["evt_2"]
    finally:
        store.close()
        observer.close()


@pytest.mark.parametrize(("lease", "bound"), [(None, "5s"), (3.0, "1s"), (60.0, "20s")])
def test_a_leaders_store_sessions_are_bounded_by_the_configured_lease(
    postgres_db: Database, tmp_path: Path, lease: float | None, bound: str
) -> None:
    """A leader's store (fenced) bounds its statements at a third of `[state] lease` (the default 15 s:
    5 s), never a silent 15 s lease's; a store that leads nothing keeps the server's settings."""
    from dataclasses import replace

    state = _pg(postgres_db, tmp_path).state()
    assert state.postgres is not None
    if lease is not None:
        state = replace(state, postgres=replace(state.postgres, lease=lease))
    with closing(open_store(state, fence_epoch=lambda: None)) as fenced, closing(open_store(state)) as plain:
        for setting in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout"):
            assert fenced._live("read").execute(f"SHOW {setting}").fetchone() == (bound,)  # type: ignore[attr-defined]
        assert plain._live("read").execute("SHOW statement_timeout").fetchone() == ("0",)  # type: ignore[attr-defined]


def test_sink_health_follows_the_attempts_in_their_order(store: Store) -> None:
    """Attempts written together count in order: a success after a failure ends the streak, a failure
    after a success starts one (at the failure's time)."""
    from watcher.state.records import Recorded

    def attempt(success: bool, now: float) -> Recorded:
        return Recorded("a", (), now, 200 if success else 500, 0.1, success)

    store.record_attempts([attempt(False, 10.0), attempt(True, 11.0)])
    assert store.failing_since("a") is None
    store.record_attempts([attempt(True, 12.0), attempt(False, 13.0), attempt(False, 14.0)])
    assert store.failing_since("a") == 13.0
    [state] = store.sink_states(["a"], only=True)
    assert state.last_success_at == 12.0
    # A batch of failures alone continues the streak; a success ending one batch is the last word.
    store.record_attempts([attempt(False, 15.0), attempt(False, 16.0)])
    assert store.failing_since("a") == 13.0
    store.record_attempts([attempt(False, 17.0), attempt(True, 18.0)])
    assert store.failing_since("a") is None
    assert store.sink_states(["a"], only=True)[0].last_success_at == 18.0
