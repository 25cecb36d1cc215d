"""An outsider's attack on the leadership (issue 21): each test is a fault the attack confirmed.

Real PostgreSQL (each test its own database), the real Leadership loop in a thread, a TCP proxy
for the network faults. What held under attack is listed in docs/leadership.md.
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from psycopg import sql

from tests.support.daemon import wait_until
from tests.support.leaders import LeaderThread
from tests.support.postgres import PG_PASSWORD, Database
from tests.support.tcpproxy import TcpProxy
from watcher.errors import Deposed, StateError
from watcher.leadership import Leadership, fence, leadership_ddl, session_conninfo
from watcher.lease import LeaseTimings, Role

TTL = 3.0
TIMINGS = LeaseTimings(TTL)
SCHEMA = "convertr_acme"
PATIENCE = 4 * TIMINGS.takeover_bound


def _lease(db: Database) -> tuple[int, str] | None:
    with psycopg.connect(db.url) as conn:
        query = sql.SQL("SELECT epoch, holder FROM {}.leadership").format(sql.Identifier(SCHEMA))
        row = conn.execute(query).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))


def _operator(db: Database, statement: str) -> None:
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(sql.SQL(statement).format(s=sql.Identifier(SCHEMA)))


def _fence_refuses(db: Database, epoch: int) -> bool:
    with psycopg.connect(db.url) as conn:
        try:
            with conn.transaction():
                fence(conn, SCHEMA, epoch)
        except Deposed:
            return True
    return False


def _one_leader(daemons: list[LeaderThread]) -> LeaderThread | None:
    """The leader, when exactly one daemon believes it leads."""
    leading = [d for d in daemons if d.leading()]
    return leading[0] if len(leading) == 1 else None


@pytest.mark.parametrize(
    "operator", ["DELETE FROM {s}.leadership", "DROP TABLE {s}.leadership", "TRUNCATE {s}.leadership"]
)
def test_after_an_operator_removes_the_lease_someone_leads_again_and_the_old_epoch_stays_refused(
    postgres_db: Database, operator: str
) -> None:
    """Attack: an operator deletes the lease row (or drops the table) while a leader works.

    Confirmed: the next claim started again at epoch 1, the epoch the old leader held, so the old
    leader's fence passed beside the new leader's (split brain for a paused or slow leader); and
    after DROP TABLE no daemon made the table again (it was made once per process): nobody led.
    """
    a = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-a")
    b = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-b")
    daemons = [a, b]
    try:
        first = wait_until(lambda: _one_leader(daemons), PATIENCE, "one to lead")
        old_epoch = first.leadership.epoch
        assert old_epoch is not None
        _operator(postgres_db, operator)
        wait_until(lambda: (lease := _lease_or_none(postgres_db)) and lease[0] != old_epoch, PATIENCE, "a new claim")
        # The old leader may believe it leads until its next renewal (ttl/3): the fence refuses it meanwhile.
        assert _fence_refuses(postgres_db, old_epoch), "the old leader's epoch is still admitted by the fence"
        new = wait_until(lambda: _one_leader(daemons), PATIENCE, "a new leader alone")
        assert new.leadership.epoch not in (None, old_epoch)
        assert _fence_refuses(postgres_db, old_epoch), "the old leader's epoch is still admitted by the fence"
    finally:
        a.stop()
        b.stop()


def _lease_or_none(db: Database) -> tuple[int, str] | None:
    try:
        return _lease(db)
    except psycopg.errors.UndefinedTable:
        return None


def test_a_standby_whose_takeover_answer_was_lost_resumes_its_own_lease(postgres_db: Database) -> None:
    """Attack: a one-way partition swallows the answer to the standby's takeover COMMIT.

    Confirmed: the takeover committed (the row names the standby), but the standby never learned
    it, saw "a live lease held by someone" and waited for its own lease to run out: nobody led for
    a whole extra lease, past the stated bound. Now a daemon that finds itself the holder renews
    that lease (same epoch: nobody led in between) and leads at its next look.
    """
    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        for statement in leadership_ddl(SCHEMA):
            conn.execute(statement)
        # A leader that died half-way through its lease.
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.leadership VALUES ('leader', 7, 'dead', 'host-dead', 1, now(), now(), "
                "clock_timestamp() + interval '2 seconds')"
            ).format(sql.Identifier(SCHEMA))
        )
    with TcpProxy("127.0.0.1", postgres_db.server.port) as proxy:
        url = f"postgresql://{postgres_db.server.user}@127.0.0.1:{proxy.port}/{postgres_db.name}"
        b = LeaderThread(url, SCHEMA, TTL, "host-b")
        try:
            members = sql.SQL("SELECT count(*) FROM {}.leadership_members").format(sql.Identifier(SCHEMA))
            with psycopg.connect(postgres_db.url, autocommit=True) as conn:
                wait_until(lambda: conn.execute(members).fetchone() == (1,), PATIENCE, "b to stand by")
            proxy.lose_answers_after(b"COMMIT")
            wait_until(lambda: (_lease(postgres_db) or (0, ""))[0] == 8, PATIENCE, "b's takeover to commit")
            assert not b.leading()
            wait_until(b.leading, PATIENCE, "b to lead")
            assert b.leadership.epoch == 8, "b waited for its own lease to expire and took another epoch"
        finally:
            b.stop()


def test_a_url_that_does_not_parse_is_refused_without_echoing_its_password() -> None:
    """Attack: a password with a stray '%' (common in generated passwords) in the URL.

    Confirmed: libpq's parse error quoted the whole user-info part, password included, and the
    message went out as the error of Leadership() and session_conninfo().
    """
    url = f"postgresql://watcher:{PG_PASSWORD}%zz@127.0.0.1:5432/state"
    with pytest.raises(StateError) as refused:
        session_conninfo(url, TIMINGS)
    assert PG_PASSWORD not in str(refused.value)
    assert "URL" in str(refused.value)
    with pytest.raises(StateError) as again:
        Leadership(url, SCHEMA, TIMINGS)
    assert PG_PASSWORD not in str(again.value)


def test_a_daemon_stopped_during_its_takeover_leaves_no_query_running_behind(postgres_db: Database) -> None:
    """Attack: the daemon is stopped (its task cancelled) while its takeover waits for a row lock.

    Confirmed: cancelling run() left the takeover query running in a task of its own, still
    pending after run() returned: once the lock came free it could commit the takeover and promote
    a daemon that had stopped (a live lease held by nobody, for a whole lease), or, the loop
    closing, it was destroyed pending. Now the query in hand is cancelled with the loop.
    """
    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        for statement in leadership_ddl(SCHEMA):
            conn.execute(statement)
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.leadership VALUES ('leader', 7, 'dead', 'host-dead', 1, now(), now(), "
                "clock_timestamp())"
            ).format(sql.Identifier(SCHEMA))
        )
    waiting = """SELECT count(*) FROM pg_stat_activity
                 WHERE application_name LIKE 'convertr-watcher leadership %' AND wait_event_type = 'Lock'"""
    live = sql.SQL("SELECT epoch FROM {}.leadership WHERE expires_at > clock_timestamp()").format(
        sql.Identifier(SCHEMA)
    )

    Conn = psycopg.Connection[tuple[object, ...]]

    async def scenario(holder: Conn, watch: Conn) -> None:
        leadership = Leadership(postgres_db.url, SCHEMA, TIMINGS)
        task = asyncio.create_task(leadership.run())
        deadline = time.monotonic() + PATIENCE
        while watch.execute(waiting).fetchone() != (1,):
            assert time.monotonic() < deadline, "the takeover never waited for the lock"
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        holder.execute("COMMIT")  # the lock comes free: a query left behind would take over now
        assert left == [], f"run() returned with work still running: {left}"
        assert leadership.role is Role.STANDBY and leadership.epoch is None
        assert watch.execute(live).fetchone() is None, "a stopped daemon holds a live lease"

    with psycopg.connect(postgres_db.url) as holder, psycopg.connect(postgres_db.url, autocommit=True) as watch:
        holder.execute("BEGIN")
        fence(holder, SCHEMA, 7)  # the dead leader's fenced transaction, still open: the takeover waits
        asyncio.run(scenario(holder, watch))


def test_a_partition_while_the_server_sends_a_fenced_result_does_not_hold_the_takeover(postgres_db: Database) -> None:
    """Attack: the network goes silent while the server is sending a large result of a fenced transaction.

    Confirmed: the backend sat in ClientWrite ('active', so neither idle_in_transaction nor
    statement_timeout ends it: the server cannot cancel mid-message) holding the fence's row lock,
    and every takeover timed out on it: no leader for as long as TCP keeps trying (30 s watched,
    about 15 min by the kernel's defaults). The server-side tcp_user_timeout in session_conninfo
    now drops that connection within op_timeout.
    """
    with TcpProxy("127.0.0.1", postgres_db.server.port) as proxy:
        via = f"postgresql://{postgres_db.server.user}@127.0.0.1:{proxy.port}/{postgres_db.name}"
        a = LeaderThread(via, SCHEMA, TTL, "host-a")
        b: LeaderThread | None = None
        store: psycopg.Connection[tuple[object, ...]] | None = None
        try:
            epoch = wait_until(lambda: a.leadership.epoch if a.leading() else None, PATIENCE, "a to lead")
            b = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-b")
            store = psycopg.connect(session_conninfo(via, TIMINGS))
            store.execute("BEGIN")
            fence(store, SCHEMA, epoch)
            proxy.lose_answers_after(b"generate_series")
            big = store.pgconn  # the query is sent and its answer never read: the server blocks sending it
            big.send_query(b"SELECT repeat('x', 1000) FROM generate_series(1, 200000)")
            sending = """SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'ClientWrite'
                         AND query LIKE '%generate_series%' AND pid <> pg_backend_pid()"""
            with psycopg.connect(postgres_db.url, autocommit=True) as watch:
                wait_until(lambda: watch.execute(sending).fetchone() == (1,), PATIENCE, "the server to block sending")
            proxy.blackhole()  # and now the leader is cut off altogether
            wait_until(b.leading, PATIENCE, "b to take over")
            assert _fence_refuses(postgres_db, epoch)
        finally:
            proxy.heal()
            if store is not None:
                store.close()
            if b is not None:
                b.stop()
            a.stop()
