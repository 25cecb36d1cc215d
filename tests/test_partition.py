"""A leader cut off in the middle of a pipelined write: the standby still takes over within the bound.

The state store writes in pipeline mode: after the fence's answer the server waits for the rest
of the pipeline. If the network goes silent then (no FIN, no RST: here a TCP proxy that stops
forwarding), the backend stays `active` in ClientRead, holding the fence's row lock on the lease
and the state's writer lock. No session timeout applies (no statement runs; the session is not
idle in a transaction), and server-side keepalives are answered by the proxy's kernel. Before the
fix the standby's takeover waited on that row lock, timed out, and tried again for ever.

Real PostgreSQL, a real proxy, the real store (`open_postgres`) and Leadership on their own threads.
"""

from __future__ import annotations

import secrets
import threading
import time

import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from tests.support.daemon import wait_until
from tests.support.leaders import LeaderThread
from tests.support.postgres import Database
from tests.support.tcpproxy import TcpProxy
from watcher.config import PostgresState
from watcher.errors import Deposed, StateError
from watcher.leadership import application_name
from watcher.lease import LeaseTimings
from watcher.state.postgres import PostgresStore, open_postgres

SCHEMA = "convertr_partition"
TTL = 3.0
TIMINGS = LeaseTimings(TTL)
PATIENCE = 20.0
# Scheduling slack on a loaded two-core machine: the bound itself is TIMINGS.takeover_bound.
SLACK = 1.5


def _stuck_in_client_read(db: Database, name: str) -> bool:
    """The session named `name` is what the fault leaves: active, waiting to read the rest of the pipeline."""
    with psycopg.connect(db.url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT state, wait_event FROM pg_stat_activity WHERE application_name = %s", (name,)
        ).fetchall()
    return found == [("active", "ClientRead")]


def _tracks(db: Database) -> list[tuple[str, str]]:
    with psycopg.connect(db.url) as conn:
        query = sql.SQL("SELECT signature, track FROM {}.tracks ORDER BY signature").format(sql.Identifier(SCHEMA))
        return [(str(a), str(b)) for a, b in conn.execute(query).fetchall()]


def _holds_the_fence(db: Database, name: str) -> bool:
    """The session named `name` holds its lock on the lease table: the fence has run on the server."""
    with psycopg.connect(db.url, autocommit=True) as conn:
        found = conn.execute(
            sql.SQL(
                """SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                   WHERE a.application_name = %s AND l.granted AND l.relation = '{}.leadership'::regclass"""
            ).format(sql.Identifier(SCHEMA)),
            (name,),
        ).fetchone()
    return found is not None and int(found[0]) > 0


def _write_cut_mid_pipeline(
    store: PostgresStore, proxy: TcpProxy, db: Database, name: str
) -> tuple[threading.Thread, list[BaseException | None]]:
    """A fenced write on a thread, the proxy silenced while it is open (once the server has run the
    fence, before the rest of the pipeline: the fence is sent without waiting for its answer, so the
    server's lock, not the client's progress, says when): the thread then waits on the silent socket;
    its outcome lands in the list."""
    inside = threading.Event()
    cut_done = threading.Event()
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            with store.transaction() as tx:
                inside.set()  # fenced: the lease row is locked FOR KEY SHARE until the end
                cut_done.wait(PATIENCE)
                tx.execute("INSERT INTO tracks (signature, track) VALUES (?, ?)", ("cut", "a"))
            outcome.append(None)
        except BaseException as exc:  # the test reads it
            outcome.append(exc)

    writer = threading.Thread(target=write, name="cut-off-writer", daemon=True)
    writer.start()
    assert inside.wait(PATIENCE), "the fenced write did not start"
    wait_until(lambda: _holds_the_fence(db, name), PATIENCE, "the fence to run on the server")
    proxy.blackhole()
    cut_done.set()
    return writer, outcome


def test_a_leader_cut_off_mid_pipeline_is_taken_over_within_the_bound_and_its_write_never_commits(
    postgres_db: Database,
) -> None:
    server = postgres_db.server
    with TcpProxy(server.host, server.port) as proxy:
        via_proxy = f"postgresql://{server.user}@{proxy.host}:{proxy.port}/{postgres_db.name}"
        a = LeaderThread(via_proxy, SCHEMA, TTL, "host-a")
        b: LeaderThread | None = None
        store: PostgresStore | None = None
        try:
            wait_until(a.leading, PATIENCE, "a to lead")
            leadership = a.leadership
            epoch_a = leadership.epoch
            assert epoch_a is not None
            state = PostgresState(
                url=via_proxy, host=proxy.host, port=proxy.port, dbname=postgres_db.name, schema=SCHEMA
            )
            store = open_postgres(
                state,
                fence_epoch=lambda: epoch_a,  # never asks whether it still leads: the fence alone decides
                timings=TIMINGS,
                member=leadership.member,
            )
            with store.transaction() as tx:  # one write that commits: the store works through the proxy
                tx.execute("INSERT INTO tracks (signature, track) VALUES (?, ?)", ("before", "a"))
            b = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-b")

            writer, outcome = _write_cut_mid_pipeline(
                store, proxy, postgres_db, application_name("state", leadership.member)
            )
            cut = time.monotonic()
            name = application_name("state", leadership.member)
            wait_until(lambda: _stuck_in_client_read(postgres_db, name), PATIENCE, "the backend in ClientRead")

            wait_until(
                lambda: b is not None and b.led_at() is not None,
                TIMINGS.takeover_bound + PATIENCE,
                "b to take over from the leader cut off mid-pipeline",
            )
            stopped, took_over = a.stepped_down_at(), b.led_at()
            assert stopped is not None and took_over is not None
            print(
                f"\nmid-pipeline partition (lease {TTL:g} s, bound {TIMINGS.takeover_bound:g} s): "
                f"a stopped {stopped - cut:.2f} s after the cut, b led {took_over - cut:.2f} s after it"
            )
            assert stopped < took_over, "the cut-off leader was still working when the standby took over"
            assert took_over - cut <= TIMINGS.takeover_bound + SLACK
            assert b.leadership.epoch == epoch_a + 1
            assert not _stuck_in_client_read(postgres_db, name)

            proxy.heal()  # what the cut-off leader sent now arrives: at a session the server has ended
            writer.join(PATIENCE)
            assert not writer.is_alive()
            assert len(outcome) == 1 and isinstance(outcome[0], StateError), outcome
            with pytest.raises(Deposed), store.transaction() as tx:  # a new session: refused by the fence
                tx.execute("INSERT INTO tracks (signature, track) VALUES (?, ?)", ("after", "a"))
        finally:
            proxy.heal()
            if store is not None:
                store.close()
            if b is not None:
                b.stop()
            a.stop()
        assert _tracks(postgres_db) == [("before", "a")]


def test_a_standby_whose_role_may_not_end_the_leaders_sessions_says_so_once_and_waits_for_them(
    postgres_db: Database,
) -> None:
    """The standby runs as another role, which may not signal the leader's backends (a superuser's):
    it says so once, takes nothing while the cut-off session holds the fence's lock (the takeover
    times out on it, as before the fix), and once the network heals there is one leader again."""
    server = postgres_db.server
    role = f"watcher_nosignal_{secrets.token_hex(4)}"
    with psycopg.connect(postgres_db.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(*map(sql.Identifier, (postgres_db.name, role)))
        )
    as_role = f"postgresql://{role}@{server.host}:{server.port}/{postgres_db.name}"
    try:
        _without_the_right_to_signal(postgres_db, as_role, role)
    finally:
        with psycopg.connect(postgres_db.url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _without_the_right_to_signal(postgres_db: Database, as_role: str, role: str) -> None:
    server = postgres_db.server
    with TcpProxy(server.host, server.port) as proxy, capture_logs() as logs:
        via_proxy = f"postgresql://{server.user}@{proxy.host}:{proxy.port}/{postgres_db.name}"
        a = LeaderThread(via_proxy, SCHEMA, TTL, "host-a")
        b: LeaderThread | None = None
        store: PostgresStore | None = None
        try:
            wait_until(a.leading, PATIENCE, "a to lead")
            leadership = a.leadership
            epoch_a = leadership.epoch
            state = PostgresState(
                url=via_proxy, host=proxy.host, port=proxy.port, dbname=postgres_db.name, schema=SCHEMA
            )
            store = open_postgres(state, fence_epoch=lambda: epoch_a, timings=TIMINGS, member=leadership.member)
            with psycopg.connect(postgres_db.url, autocommit=True) as admin:
                for grant in (
                    "GRANT USAGE, CREATE ON SCHEMA {} TO {}",
                    "GRANT ALL ON ALL TABLES IN SCHEMA {} TO {}",
                ):
                    admin.execute(sql.SQL(grant).format(sql.Identifier(SCHEMA), sql.Identifier(role)))
            b = LeaderThread(as_role, SCHEMA, TTL, "host-b")
            writer, _ = _write_cut_mid_pipeline(store, proxy, postgres_db, application_name("state", leadership.member))
            name = application_name("state", leadership.member)
            wait_until(lambda: _stuck_in_client_read(postgres_db, name), PATIENCE, "the backend in ClientRead")

            # Past the bound, several looks have found the lease expired and could not take it.
            deadline = time.monotonic() + TIMINGS.takeover_bound + 2 * TIMINGS.poll_every
            while time.monotonic() < deadline:
                assert b.led_at() is None, "the standby took over while the old session held the fence's lock"
                time.sleep(0.05)
            refusals = [e for e in logs if "cannot end the previous leader's sessions" in e["event"]]
            assert len(refusals) == 1, refusals
            assert "another role" in refusals[0]["reason"]
            assert b.leadership.last_error is not None  # each takeover ran out of time on the row lock

            healed = time.monotonic()
            proxy.heal()  # the rest of the pipeline arrives, the transaction ends, its lock goes
            writer.join(PATIENCE)
            assert not writer.is_alive()
            # Nobody led since: the old holder may resume its own lease (same epoch), or b take it over.
            wait_until(lambda: a.leading() or (b is not None and b.leading()), TIMINGS.takeover_bound, "a leader again")
            who = "b took over" if b.leading() else f"a resumed its lease (epoch {a.leadership.epoch})"
            print(f"\nno right to signal: {who} {time.monotonic() - healed:.2f} s after the network healed")
            assert not (a.leading() and b.leading())
            assert a.leadership.epoch == epoch_a if a.leading() else b.leadership.epoch == epoch_a + 1
        finally:
            proxy.heal()
            if store is not None:
                store.close()
            if b is not None:
                b.stop()
            a.stop()
