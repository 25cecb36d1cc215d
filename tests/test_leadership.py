"""Leadership on a real PostgreSQL: one leads, a standby takes over, and a deposed leader commits nothing.

Each test has its own database (tests/support/postgres.py). Leases are short (3 s) so failovers
take seconds; the measured takeover times are printed (pytest -s) and gathered by `make bench`-style
scripts, never asserted as speed: the deadlines below only bound how long a test waits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.support.daemon import wait_until
from tests.support.leaders import LeaderProcess, LeaderThread, writes_table
from tests.support.postgres import PG_PASSWORD, Database
from tests.support.tcpproxy import TcpProxy
from watcher.errors import Deposed, StateError
from watcher.leadership import fence, read_status, session_conninfo
from watcher.lease import MIN_TTL, LeaseTimings, Role

TTL = MIN_TTL  # the shortest `[state] lease` a configuration allows
TIMINGS = LeaseTimings(TTL)
SCHEMA = "convertr_acme"
# How long a test waits for a takeover: several bounds, so a loaded machine does not fail it.
PATIENCE = 4 * TIMINGS.takeover_bound


def _writes(db: Database, schema: str = SCHEMA) -> list[tuple[int, int, int]]:
    with psycopg.connect(db.url) as conn:
        query = sql.SQL("SELECT n, epoch, pid FROM {}.writes ORDER BY written_at").format(sql.Identifier(schema))
        return [tuple(r) for r in conn.execute(query).fetchall()]  # type: ignore[misc]


def _lease(db: Database, schema: str = SCHEMA) -> tuple[int, str, object]:
    with psycopg.connect(db.url) as conn:
        query = sql.SQL("SELECT epoch, host, since FROM {}.leadership").format(sql.Identifier(schema))
        row = conn.execute(query).fetchone()
        assert row is not None
        return row[0], row[1], row[2]


def _fenced_insert(conn: psycopg.Connection[tuple[object, ...]], epoch: int, n: int) -> None:
    with conn.transaction():
        fence(conn, SCHEMA, epoch)
        conn.execute(
            sql.SQL("INSERT INTO {}.writes (n, epoch, pid) VALUES (%s, %s, 0)").format(sql.Identifier(SCHEMA)),
            (n, epoch),
        )


def test_one_leads_the_other_stands_by_and_takes_over_on_a_clean_stop(postgres_db: Database) -> None:
    a = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-a")
    wait_until(a.leading, PATIENCE, "a to lead")
    b = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-b")
    try:
        epoch_a = a.leadership.epoch
        assert epoch_a is not None
        writes_table(postgres_db.url, SCHEMA)
        with psycopg.connect(postgres_db.url) as conn:
            # Status: who leads, since when, who stands by.
            wait_until(lambda: read_status(conn, SCHEMA, TIMINGS).standbys, PATIENCE, "b to register")
            status = read_status(conn, SCHEMA, TIMINGS)
            assert status.leader is not None and (status.leader.host, status.leader.epoch) == ("host-a", epoch_a)
            assert [m.host for m in status.standbys] == ["host-b"]
            assert status.as_json()["leader"]["host"] == "host-a"
            _fenced_insert(conn, epoch_a, 1)
        assert not b.leading()
        stopped = time.monotonic()
        a.stop()  # releases the lease
        wait_until(lambda: b.led_at() is not None, PATIENCE, "b to take over (recorded)")
        print(f"\nclean handover: b led {b.led_at() - stopped:.2f}s after a stopped")  # type: ignore[operator]
        assert b.leadership.epoch == epoch_a + 1
        with psycopg.connect(postgres_db.url) as conn:
            with pytest.raises(Deposed) as refused:
                _fenced_insert(conn, epoch_a, 2)
            assert (refused.value.epoch, refused.value.current) == (epoch_a, epoch_a + 1)
            assert isinstance(refused.value, StateError)
            _fenced_insert(conn, epoch_a + 1, 3)
            status = read_status(conn, SCHEMA, TIMINGS)
            assert status.leader is not None and status.leader.host == "host-b" and status.standbys == ()
        assert [n for n, _, _ in _writes(postgres_db)] == [1, 3]
    finally:
        b.stop()
        a.stop()


def test_a_busy_leader_renews_through_its_own_fenced_transactions(postgres_db: Database) -> None:
    """A fenced transaction held open for twice the lease does not keep the leader from renewing
    (the fence's FOR KEY SHARE lets the renewal's non-key UPDATE through), while a standby's
    takeover would wait for it (FOR UPDATE)."""
    a = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-a")
    try:
        wait_until(a.leading, PATIENCE, "a to lead")
        writes_table(postgres_db.url, SCHEMA)
        epoch = a.leadership.epoch
        assert epoch is not None
        with psycopg.connect(postgres_db.url) as conn:  # no session timeouts: it may stay open
            conn.execute("BEGIN")
            fence(conn, SCHEMA, epoch)
            with psycopg.connect(postgres_db.url, autocommit=True) as other:
                other.execute("SET lock_timeout = '200ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    other.execute(sql.SQL("SELECT 1 FROM {}.leadership FOR UPDATE").format(sql.Identifier(SCHEMA)))
            held_until = time.monotonic() + 2 * TTL
            while time.monotonic() < held_until:
                assert a.leading(), "the leader stopped while its own transaction was open"
                time.sleep(0.05)
            conn.execute("COMMIT")
        assert a.changes[-1][1] is Role.LEADER and a.leadership.epoch == epoch
    finally:
        a.stop()


def test_fence_must_run_inside_the_transaction(postgres_db: Database) -> None:
    a = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-a")
    try:
        wait_until(a.leading, PATIENCE, "a to lead")
        with psycopg.connect(postgres_db.url, autocommit=True) as conn, pytest.raises(RuntimeError):
            fence(conn, SCHEMA, 1)
    finally:
        a.stop()


def test_two_standbys_racing_for_an_expired_lease_make_one_leader(postgres_db: Database) -> None:
    """Three daemons start at once on an empty schema: one epoch, one leader, every time."""
    daemons = [LeaderThread(postgres_db.url, SCHEMA, TTL, f"host-{i}") for i in range(3)]
    try:
        wait_until(lambda: any(d.leading() for d in daemons), PATIENCE, "a leader")
        time.sleep(TIMINGS.renew_every * 2)  # several rounds of looks and renewals: still one
        assert sum(d.leading() for d in daemons) == 1
        first = _lease(postgres_db)[0]
        leader = next(d for d in daemons if d.leading())
        leader.stop()
        wait_until(lambda: sum(d.leading() for d in daemons) == 1, PATIENCE, "one new leader")
        assert _lease(postgres_db)[0] == first + 1
    finally:
        for d in daemons:
            d.stop()


def test_several_enterprises_in_one_database_have_a_leader_each(postgres_db: Database) -> None:
    a = LeaderThread(postgres_db.url, "convertr_acme", TTL, "acme")
    b = LeaderThread(postgres_db.url, "convertr_beta", TTL, "beta")
    try:
        wait_until(lambda: a.leading() and b.leading(), PATIENCE, "both to lead")
        assert _lease(postgres_db, "convertr_acme")[:2] == (a.leadership.epoch, "acme")
        assert _lease(postgres_db, "convertr_beta")[:2] == (b.leadership.epoch, "beta")
    finally:
        a.stop()
        b.stop()


def test_a_partitioned_leader_stops_first_then_the_standby_leads_and_the_old_write_cannot_commit(
    postgres_db: Database,
) -> None:
    """The leader reaches the database through a proxy that goes silent (no FIN, no RST), in the middle
    of a fenced transaction. It stops leading by its own clock before the standby can take over; the
    server ends its open transaction; the standby takes over; after the network heals, the old
    transaction's commit fails and a new one is refused by the fence."""
    writes_table(postgres_db.url, SCHEMA)
    server = postgres_db.server
    with TcpProxy(server.host, server.port) as proxy:
        via_proxy = f"postgresql://{server.user}@{proxy.host}:{proxy.port}/{postgres_db.name}"
        a = LeaderThread(via_proxy, SCHEMA, TTL, "host-a")
        wait_until(a.leading, PATIENCE, "a to lead")
        b = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-b")
        try:
            epoch_a = a.leadership.epoch
            assert epoch_a is not None
            store = psycopg.connect(session_conninfo(via_proxy, TIMINGS))  # the leader's store connection
            store.execute("BEGIN")
            fence(store, SCHEMA, epoch_a)
            store.execute(sql.SQL("INSERT INTO {}.writes VALUES (1, %s, 0)").format(sql.Identifier(SCHEMA)), (epoch_a,))
            cut = time.monotonic()
            proxy.blackhole()
            wait_until(lambda: b.led_at() is not None, PATIENCE, "b to take over (recorded)")
            stopped, took_over = a.stepped_down_at(), b.led_at()
            assert stopped is not None and took_over is not None
            print(f"\npartition: a stopped {stopped - cut:.2f}s after the cut, b led {took_over - cut:.2f}s after it")
            assert stopped < took_over, "the cut-off leader was still working when the standby took over"
            assert not a.leading()
            assert b.leadership.epoch == epoch_a + 1
            proxy.heal()
            with pytest.raises(psycopg.Error):
                store.execute("COMMIT")  # the server ended the session it left idle in transaction
            store.close()
            with psycopg.connect(session_conninfo(via_proxy, TIMINGS)) as again, pytest.raises(Deposed):
                _fenced_insert(again, epoch_a, 2)
            assert _writes(postgres_db) == []
        finally:
            proxy.heal()
            b.stop()
            a.stop()


def test_a_killed_leader_is_replaced_within_the_bound(postgres_db: Database) -> None:
    """SIGKILL: the kernel closes its sockets, the lease ends by the database's clock, a standby leads."""
    writes_table(postgres_db.url, SCHEMA)
    leader = LeaderProcess(postgres_db.url, SCHEMA, TTL)
    b: LeaderThread | None = None
    try:
        first = leader.wait_for("leading", PATIENCE)["epoch"]
        b = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-b")
        leader.wait_for("committed", PATIENCE)
        killed = time.monotonic()
        leader.proc.send_signal(signal.SIGKILL)
        wait_until(lambda: b.led_at() is not None, PATIENCE, "b to take over (recorded)")
        took = b.led_at() - killed  # type: ignore[operator]
        print(f"\nSIGKILL: b led {took:.2f}s after the kill (bound {TIMINGS.takeover_bound:.2f}s)")
        epoch_b = b.leadership.epoch
        assert epoch_b == first + 1
        assert {epoch for _, epoch, _ in _writes(postgres_db)} == {first}
    finally:
        leader.end()
        if b is not None:
            b.stop()


def test_a_standby_with_a_shorter_lease_still_waits_for_the_leaders_own_expiry(postgres_db: Database) -> None:
    """Leases that differ (docs/leadership.md): the holder writes its expiry with its own lease, a standby
    only compares it with the database clock. A standby on a 3 s lease, its leader on 2 leases, SIGKILLed:
    the standby leads no earlier than the expiry the leader last wrote, which lay beyond the standby's own
    lease from the kill; the takeover still comes within the dead leader's lease + the standby's look."""
    long = LeaseTimings(2 * TTL)
    writes_table(postgres_db.url, SCHEMA)
    leader = LeaderProcess(postgres_db.url, SCHEMA, long.ttl)
    b: LeaderThread | None = None
    try:
        leader.wait_for("leading", PATIENCE)
        b = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-b")
        wait_until(lambda: b.leadership.leader is not None, PATIENCE, "b to see the leader")
        expiry = sql.SQL("SELECT expires_at, clock_timestamp() FROM {}.leadership").format(sql.Identifier(SCHEMA))
        with psycopg.connect(postgres_db.url, autocommit=True) as conn:

            def lease_row() -> tuple[Any, Any]:
                row = conn.execute(expiry).fetchone()
                assert row is not None
                return row[0], row[1]

            # Right after a renewal, so the lease left is more than the standby's own lease.
            before = lease_row()[0]
            wait_until(lambda: lease_row()[0] != before, PATIENCE, "a renewal")
            expires_at, db_now = lease_row()
            left = (expires_at - db_now).total_seconds()
            assert left > TTL, f"only {left:.2f}s of the leader's lease left: the test cannot tell the leases apart"
            killed = time.monotonic()
            leader.proc.send_signal(signal.SIGKILL)
            wait_until(lambda: b.led_at() is not None, PATIENCE + long.ttl, "b to take over (recorded)")
            _, host, since = _lease(postgres_db)
        took = b.led_at() - killed  # type: ignore[operator]
        print(
            f"\nleader's lease {long.ttl:g}s, standby's {TTL:g}s: {left:.2f}s left at the kill, b led {took:.2f}s after"
        )
        assert host == "host-b"
        assert since >= expires_at, "the standby took over before the leader's own expiry"
        assert took <= long.ttl + TIMINGS.poll_every + TIMINGS.op_timeout + PATIENCE
    finally:
        leader.end()
        if b is not None:
            b.stop()


@pytest.mark.parametrize("where", ["inside a transaction", "between transactions"])
def test_a_leader_paused_past_its_lease_commits_nothing_after_resuming(postgres_db: Database, where: str) -> None:
    """SIGSTOP for longer than the lease, SIGCONT after the standby took over: nothing the paused
    leader does afterwards commits. Between transactions it writes without asking whether it still
    leads (--ignore-lease), so the fence alone must refuse it."""
    writes_table(postgres_db.url, SCHEMA)
    inside = where == "inside a transaction"
    leader = LeaderProcess(postgres_db.url, SCHEMA, TTL, hold=0.5 if inside else 0.0, ignore_lease=not inside)
    b: LeaderThread | None = None
    try:
        first = leader.wait_for("leading", PATIENCE)["epoch"]
        b = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-b")
        paused_at = leader.wait_for("in_tx" if inside else "committed", PATIENCE)
        os.kill(leader.proc.pid, signal.SIGSTOP)
        paused = time.monotonic()
        wait_until(lambda: b.led_at() is not None, PATIENCE, "b to take over (recorded)")
        print(f"\nSIGSTOP {where}: b led {b.led_at() - paused:.2f}s after the pause")  # type: ignore[operator]
        _, _, b_since = _lease(postgres_db)
        os.kill(leader.proc.pid, signal.SIGCONT)
        after = leader.wait_for("standing_by" if inside else "refused", PATIENCE)
        if not inside:
            assert after["current"] == first + 1
        events = leader.drain()
        resumed = events[events.index(paused_at) + 1 :]
        assert not any(e["step"] == "committed" for e in resumed), resumed
        written = _writes(postgres_db)
        if inside:
            assert paused_at["n"] not in [n for n, _, _ in written], "the transaction open at the pause committed"
        # Every row of the old epoch was written before the takeover.
        with psycopg.connect(postgres_db.url) as conn:
            late = conn.execute(
                sql.SQL("SELECT count(*) FROM {}.writes WHERE epoch = %s AND written_at >= %s").format(
                    sql.Identifier(SCHEMA)
                ),
                (first, b_since),
            ).fetchone()
        assert late == (0,)
    finally:
        with_cont = leader.proc.poll() is None
        if with_cont:
            os.kill(leader.proc.pid, signal.SIGCONT)
        leader.end()
        if b is not None:
            b.stop()


def test_a_standby_makes_no_write_and_holds_no_lease(postgres_db: Database) -> None:
    """Standing by is reading: the lease row is the leader's, the standby only refreshes its member row."""
    a = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-a")
    wait_until(a.leading, PATIENCE, "a to lead")
    b = LeaderThread(postgres_db.url, SCHEMA, TTL, "host-b")
    try:
        time.sleep(TIMINGS.poll_every * 3)  # several looks by b
        assert not b.leading()
        assert _lease(postgres_db)[:2] == (a.leadership.epoch, "host-a")
    finally:
        b.stop()
        a.stop()


def test_leadership_logs_never_carry_the_password(postgres_db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    """A URL with a password the server does not need (trust) still never appears in what the loop logs."""
    secret = PG_PASSWORD
    server = postgres_db.server
    with TcpProxy(server.host, server.port) as proxy:
        url = f"postgresql://{server.user}:{secret}@{proxy.host}:{proxy.port}/{postgres_db.name}"
        a = LeaderThread(url, SCHEMA, TTL, "host-a")
        try:
            wait_until(a.leading, PATIENCE, "a to lead")
            proxy.blackhole()
            wait_until(lambda: not a.leading(), PATIENCE, "a to step down")
            wait_until(lambda: a.leadership.last_error, PATIENCE, "an error logged")
            proxy.heal()
        finally:
            a.stop()
    out = capsys.readouterr()
    assert "leadership" in out.out + out.err
    assert secret not in out.out + out.err
    assert secret not in (a.leadership.last_error or "")


def test_leading_is_decided_by_the_injected_monotonic_clock(postgres_db: Database) -> None:
    """leading() reads the injected clock, no I/O: past sent + ttl - margin it says no at once; the next
    renewal (sent by the same clock) restores it, in the same epoch."""
    from watcher.leadership import Leadership

    now = [1000.0]

    async def scenario() -> None:
        leadership = Leadership(postgres_db.url, SCHEMA, TIMINGS, monotonic=lambda: now[0])
        task = asyncio.create_task(leadership.run())
        epoch = await asyncio.wait_for(leadership.wait_leading(), PATIENCE)
        assert leadership.leading()
        now[0] += TTL - TIMINGS.margin
        assert not leadership.leading()
        deadline = time.monotonic() + PATIENCE
        while not leadership.leading():
            assert time.monotonic() < deadline, "no renewal restored the lease"
            await asyncio.sleep(0.02)
        assert leadership.epoch == epoch
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_session_conninfo_keeps_tls_and_the_operators_options_and_bounds_every_wait() -> None:
    from psycopg.conninfo import conninfo_to_dict

    url = (
        f"postgresql://watcher:{PG_PASSWORD}@db.internal:5433/convertr"
        "?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem&options=-c%20search_path%3Dx"
    )
    got = conninfo_to_dict(session_conninfo(url, LeaseTimings(15.0)))
    assert (got["host"], got["port"], got["dbname"], got["user"]) == ("db.internal", "5433", "convertr", "watcher")
    assert (got["sslmode"], got["sslrootcert"]) == ("verify-full", "/etc/ssl/db-ca.pem")
    assert got["options"] == (
        "-c search_path=x -c statement_timeout=5000 -c lock_timeout=5000 -c idle_in_transaction_session_timeout=5000"
        " -c tcp_user_timeout=5000 -c tcp_keepalives_idle=2 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3"
    )
    assert (got["keepalives"], got["keepalives_idle"], got["keepalives_count"], got["tcp_user_timeout"]) == (
        "1", "2", "3", "5000",
    )  # fmt: skip
    assert got["connect_timeout"] == "5"
