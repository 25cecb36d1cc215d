"""Leadership over a PostgreSQL state: one daemon leads, the others stand by and take over.

Why a lease row with a fencing epoch, not a session advisory lock: an advisory lock fences only
the writes made on the one session that holds it, and is freed only when the server notices the
session is gone, which across a partition (no FIN, no RST) takes the kernel's keepalive time or
whatever idle timeout the session set. A lease row is decided by the database's clock alone, can
be checked from any connection of the leader, and carries an epoch that every write transaction
checks (`fence`) while holding a lock on the row, so a takeover waits for the leader's
transaction in hand and every later one sees the new epoch and rolls back. See watcher.lease for
the decisions and the bound.

The tables live in the enterprise's schema (`[state] schema`), so several enterprises share one
database without sharing a leader:

    <schema>.leadership          one row: epoch, holder (member id), host, pid, since, renewed_at, expires_at
    <schema>.leadership_members  one row per running daemon, leader or standby, refreshed every look:
                                 who stands by, for `status`

The store must call `fence(conn, schema, epoch)` (or `fence_async`) inside every write
transaction on the state, and open its connections with `session_conninfo`, whose timeouts let
the server end a transaction the leader left open when it was cut off, named with
`application_name(part, member)`: a standby that finds the lease expired by the database clock
first ends the holder's sessions that are still busy (a leader cut off mid-pipeline leaves its
backend waiting in ClientRead with the fence's lock, which no timeout ends), then takes the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from watcher.errors import Deposed, StateError
from watcher.lease import (
    Action,
    LeaderInfo,
    LeaseRow,
    LeaseTimings,
    Role,
    leader_of,
    next_wait,
    standby_action,
    still_leading,
    trusted_until,
)

log = structlog.get_logger("watcher.leadership")

T = TypeVar("T")
LEASE_NAME = "leader"
APPLICATION_NAME = "convertr-watcher"
# A member unseen for this many leases is gone (killed, cut off): status no longer lists it.
MEMBER_GONE_AFTER = 3


# --------------------------------------------------------------------------------- connections


def application_name(part: str, member: str | None = None) -> str:
    """What a daemon's session calls itself in pg_stat_activity: "convertr-watcher <part> <member>".

    The member id lets a standby taking over an expired lease find the sessions of the daemon that
    held it (`_TERMINATE`); PostgreSQL cuts application_name at 63 bytes, and this stays under
    (16 hex digits of member id, the longest part "leadership").
    """
    return f"{APPLICATION_NAME} {part} {member}" if member else f"{APPLICATION_NAME} {part}"


# The parts of a daemon's sessions: its Leadership's and its state store's.
SESSION_PARTS = ("leadership", "state")


def session_conninfo(url: str, timings: LeaseTimings, application_name: str = APPLICATION_NAME) -> str:
    """The URL with the settings that bound how long a cut-off connection can hold anything.

    Server side (in `options`, for this session only): statement_timeout, lock_timeout,
    idle_in_transaction_session_timeout and tcp_user_timeout at op_timeout, so a transaction the
    leader left open when it lost the network, a query stuck behind a lock, or a result the
    server cannot deliver, is ended well inside the lease.
    Server side too, TCP keepalives at the same pace as the client's: across a real partition the
    server's socket then fails and the backend ends, whatever it was waiting for (a backend
    waiting for the rest of a pipeline, `active` in ClientRead, is beyond every timeout above).
    They cannot help when something between still acknowledges (a proxy, a load balancer that
    keeps the connection): the standby's takeover ends such sessions (`_TERMINATE`).
    Client side (libpq): TCP keepalives and tcp_user_timeout, so a real partition (unacknowledged
    packets) breaks the socket instead of waiting the kernel's two hours, and connect_timeout.
    The operator's own `options=` in the URL are kept, ours appended; TLS parameters pass untouched.
    """
    ms = int(timings.op_timeout * 1000)
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        # libpq quotes the part it could not parse, which may be the password: say what, not the value.
        problem = re.sub(r'"[^"]*"', "…", str(exc).strip())
        raise StateError(f"the PostgreSQL URL is not a valid connection string ({problem})") from None
    # tcp_user_timeout server side too: a backend blocked sending a result to a cut-off client
    # (ClientWrite) is beyond statement_timeout's reach (the server cannot cancel mid-message) and
    # would hold the fence's row lock, so the takeover, until TCP gave up (about 15 min).
    idle = max(1, int(timings.op_timeout / 2))
    ours = (
        f"-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
        f" -c tcp_user_timeout={ms}"
        f" -c tcp_keepalives_idle={idle} -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3"
    )
    options = f"{given['options']} {ours}" if given.get("options") else ours
    return make_conninfo(
        url,
        options=options,
        application_name=application_name,
        connect_timeout=max(2, math.ceil(timings.op_timeout)),
        keepalives=1,
        keepalives_idle=idle,
        keepalives_interval=1,
        keepalives_count=3,
        tcp_user_timeout=ms,
    )


def describe(exc: BaseException) -> str:
    """An error in a log line: its class and the server's first line, never the connection URL.

    libpq's connection errors name host and port, not the password; still only the class and
    the SQLSTATE are kept for errors raised while connecting, which may echo conninfo.
    """
    if isinstance(exc, TimeoutError):
        return "no answer before the deadline"
    if isinstance(exc, psycopg.Error):
        state = f" {exc.sqlstate}" if exc.sqlstate else ""
        primary = exc.diag.message_primary if exc.sqlstate else None
        return f"{type(exc).__name__}{state}" + (f": {primary}" if primary else "")
    return type(exc).__name__


# ------------------------------------------------------------------------------------------ SQL


def leadership_ddl(schema: str) -> list[sql.Composed]:
    """The schema and the two tables, idempotent; the state's migrations may run the same statements."""
    s = sql.Identifier(schema)
    return [
        # Made only where missing: CREATE SCHEMA needs CREATE on the database even with IF NOT EXISTS,
        # which a role given a schema of its own lacks (docs/operations-postgres.md, least privileges).
        sql.SQL(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = {}) "
            "THEN CREATE SCHEMA {}; END IF; END $$"
        ).format(sql.Literal(schema), s),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.leadership (
                name text PRIMARY KEY CHECK (name = 'leader'),
                epoch bigint NOT NULL CHECK (epoch > 0),
                holder text NOT NULL,
                host text NOT NULL,
                pid integer NOT NULL,
                since timestamptz NOT NULL,
                renewed_at timestamptz NOT NULL,
                expires_at timestamptz NOT NULL)"""
        ).format(s),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.leadership_members (
                member text PRIMARY KEY,
                host text NOT NULL,
                pid integer NOT NULL,
                role text NOT NULL,
                started_at timestamptz NOT NULL,
                seen_at timestamptz NOT NULL)"""
        ).format(s),
    ]


def _q(text: str, schema: str) -> sql.Composed:
    return sql.SQL(text).format(s=sql.Identifier(schema))


_READ = """SELECT epoch, holder, host, pid, since, expires_at, clock_timestamp()
           FROM {s}.leadership WHERE name = 'leader'"""
# No row: the first daemon ever, or an operator deleted the row (or dropped the table). The epoch
# is the database clock in microseconds, not 1: an epoch held before the row vanished (at most the
# last claim's microseconds plus one per takeover since) is then never handed out again, so a
# paused leader of that epoch stays fenced off. ON CONFLICT: another claimed it in the same instant.
_CLAIM = """INSERT INTO {s}.leadership (name, epoch, holder, host, pid, since, renewed_at, expires_at)
            VALUES ('leader', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
                    %(member)s, %(host)s, %(pid)s, clock_timestamp(), clock_timestamp(),
                    clock_timestamp() + make_interval(secs => %(ttl)s))
            ON CONFLICT (name) DO NOTHING
            RETURNING epoch, since"""
# The takeover is two statements in one transaction. FOR UPDATE first: the only row lock that
# conflicts with the fence's FOR KEY SHARE, so it waits for the old leader's fenced transactions in
# hand to end (an UPDATE of non-key columns alone would not). Then the UPDATE, only from the epoch
# read and only once expired by the database clock: of two standbys racing, the second re-checks
# the row the first wrote (a newer epoch, a live lease) and gets no row.
_LOCK = "SELECT epoch FROM {s}.leadership WHERE name = 'leader' FOR UPDATE"
# Before the FOR UPDATE: end the sessions of the daemon whose lease expired (by the database clock)
# that are still inside something (not 'idle': an idle session holds no lock). A leader cut off in
# the middle of a pipeline leaves its backend `active`, waiting in ClientRead for the rest of it:
# no statement runs, so statement_timeout does not fire, and the session is not idle in a
# transaction, so idle_in_transaction_session_timeout does not either; it holds the fence's row
# lock (and the state's writer lock) until TCP notices, which through a proxy that still
# acknowledges is never. Ending it is safe: that daemon stopped trusting its lease `margin` before
# the expiry, and what it has in hand is a fenced transaction, which the termination rolls back.
# Only backends this role may signal (its own role's, or any with pg_signal_backend; a superuser's
# only by a superuser): one it may not would fail the whole statement, so they are counted and
# left, and the takeover waits for them as before. The EXISTS re-checks that the lease read is still
# the one in the row and still expired: a holder that renewed meanwhile keeps its sessions.
_TERMINATE = """SELECT a.pid, (pg_has_role(a.usesysid, 'USAGE') OR pg_has_role('pg_signal_backend', 'USAGE'))
                       AND (NOT r.rolsuper OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user))
                FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid
                WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
                  AND a.application_name = ANY(%(names)s) AND a.state IS DISTINCT FROM 'idle'
                  AND EXISTS (SELECT 1 FROM {s}.leadership WHERE name = 'leader' AND epoch = %(epoch)s
                              AND expires_at <= clock_timestamp())"""
# Without a wait (the one-argument form every version has): the FOR UPDATE that follows waits, within
# lock_timeout, for the ended backend to let go of its locks, which takes milliseconds.
_SIGNAL = "SELECT pg_terminate_backend(pid) FROM unnest(%(pids)s::integer[]) AS pid"
_TAKE_OVER = """UPDATE {s}.leadership
                SET epoch = epoch + 1, holder = %(member)s, host = %(host)s, pid = %(pid)s,
                    since = clock_timestamp(), renewed_at = clock_timestamp(),
                    expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
                WHERE name = 'leader' AND epoch = %(epoch)s AND expires_at <= clock_timestamp()
                RETURNING epoch, since"""
# Renewing needs our epoch, expired or not: an unchanged epoch means nobody led in between. It
# changes no key column, so its row lock (FOR NO KEY UPDATE) does not wait for the fences of the
# leader's own write transactions: a busy leader still renews on time.
_RENEW = """UPDATE {s}.leadership
            SET renewed_at = clock_timestamp(), expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
            WHERE name = 'leader' AND holder = %(member)s AND epoch = %(epoch)s
            RETURNING epoch"""
_RELEASE = """UPDATE {s}.leadership SET expires_at = clock_timestamp()
              WHERE name = 'leader' AND holder = %(member)s AND epoch = %(epoch)s"""
_SEEN = """INSERT INTO {s}.leadership_members (member, host, pid, role, started_at, seen_at)
           VALUES (%(member)s, %(host)s, %(pid)s, %(role)s, clock_timestamp(), clock_timestamp())
           ON CONFLICT (member) DO UPDATE SET role = EXCLUDED.role, seen_at = EXCLUDED.seen_at"""
_GONE = "DELETE FROM {s}.leadership_members WHERE member = %(member)s"
# Members of the past: a killed daemon leaves its row; it is kept MEMBER_GONE_AFTER leases for status.
_FORGET_GONE = """DELETE FROM {s}.leadership_members
                  WHERE seen_at < clock_timestamp() - make_interval(secs => %(gone)s)"""
_MEMBERS = """SELECT member, host, pid, role, started_at, seen_at FROM {s}.leadership_members
              WHERE seen_at >= clock_timestamp() - make_interval(secs => %(gone)s) ORDER BY started_at"""
# FOR KEY SHARE: held until the fenced transaction ends, it makes a takeover's FOR UPDATE wait for
# it, and lets the leader's renewals through. Once a takeover has committed, READ COMMITTED
# follows the row to its newest version here, so the new epoch is what this reads.
_FENCE = "SELECT epoch FROM {s}.leadership WHERE name = 'leader' FOR KEY SHARE"
# The same check as a statement that fails, rather than answers, when another epoch leads (or none
# does): a pipelined transaction sends it without waiting for it, and its failure aborts the
# transaction, whose COMMIT then rolls back. The cast of a text that is no number is plain SQL's way
# to raise; `deposed` reads the epoch afterwards to say why the transaction failed.
_FENCE_OR_FAIL = (
    """SELECT CASE WHEN f.epoch IS NOT DISTINCT FROM %(epoch)s::bigint THEN 0
                         ELSE ('write fenced off: epoch ' || coalesce(f.epoch::text, 'none') || ' leads')::integer END
                    FROM (SELECT ("""
    + _FENCE
    + """) AS epoch) f"""
)
_EPOCH = "SELECT epoch FROM {s}.leadership WHERE name = 'leader'"


def _row(found: Sequence[Any] | None) -> LeaseRow | None:
    if found is None:
        return None
    epoch, holder, host, pid, since, expires_at, db_now = found
    return LeaseRow(int(epoch), holder, host, int(pid), since, expires_at, db_now)


# -------------------------------------------------------------------------------------- fencing


def _check_fence(found: Sequence[Any] | None, epoch: int) -> None:
    current = int(found[0]) if found is not None else None
    if current != epoch:
        raise Deposed(
            f"another daemon leads the state now (epoch {current}, this daemon led epoch {epoch}): write refused",
            epoch=epoch,
            current=current,
        )


def fence(conn: psycopg.Connection[Any], schema: str, epoch: int) -> None:
    """Inside a write transaction: raise Deposed unless `epoch` still leads; otherwise hold it until commit.

    The row lock taken here (FOR KEY SHARE) lasts until the transaction ends, so no standby can
    take over between this check and the commit, and a takeover that happened before it is seen here.
    """
    if conn.info.transaction_status != TransactionStatus.INTRANS:
        raise RuntimeError("fence() belongs inside the write transaction it protects")
    _check_fence(conn.execute(_q(_FENCE, schema)).fetchone(), epoch)


def fence_pipelined(conn: psycopg.Connection[Any], schema: str, epoch: int) -> None:
    """`fence` without waiting for the server: sent in the pipelined write transaction it protects,
    it makes that transaction fail (a psycopg error at its next read or at the commit) unless `epoch`
    still leads, holding the row as `fence` does. `deposed` then tells whether that was why."""
    conn.execute(_q(_FENCE_OR_FAIL, schema), {"epoch": epoch})


def deposed(conn: psycopg.Connection[Any], schema: str, epoch: int) -> Deposed | None:
    """After a fenced transaction failed: the Deposed to raise when another epoch leads (or none
    does), None when `epoch` still leads or the epoch cannot be read (the failure was another one)."""
    try:
        found = conn.execute(_q(_EPOCH, schema)).fetchone()
    except psycopg.Error:
        return None
    try:
        _check_fence(found, epoch)
    except Deposed as exc:
        return exc
    return None


async def fence_async(conn: psycopg.AsyncConnection[Any], schema: str, epoch: int) -> None:
    """`fence` for an asyncio connection."""
    if conn.info.transaction_status != TransactionStatus.INTRANS:
        raise RuntimeError("fence_async() belongs inside the write transaction it protects")
    cursor = await conn.execute(_q(_FENCE, schema))
    _check_fence(await cursor.fetchone(), epoch)


# --------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class Member:
    member: str
    host: str
    pid: int
    role: str
    started_at: datetime
    seen_at: datetime


@dataclass(frozen=True)
class LeadershipStatus:
    """What `status` shows: who leads (None: nobody), since when, and who stands by."""

    leader: LeaderInfo | None
    standbys: tuple[Member, ...]
    db_now: datetime | None

    def as_json(self) -> dict[str, Any]:
        leader = self.leader
        return {
            "leader": None
            if leader is None
            else {
                "host": leader.host,
                "pid": leader.pid,
                "epoch": leader.epoch,
                "since": leader.since.isoformat(),
                "lease_expires_at": leader.expires_at.isoformat(),
            },
            "standbys": [{"host": m.host, "pid": m.pid, "seen_at": m.seen_at.isoformat()} for m in self.standbys],
        }


def read_status(conn: psycopg.Connection[Any], schema: str, timings: LeaseTimings) -> LeadershipStatus:
    """Who leads and who stands by, read without taking any lock (for `status`)."""
    try:
        row = _row(conn.execute(_q(_READ, schema)).fetchone())
        found = conn.execute(_q(_MEMBERS, schema), {"gone": MEMBER_GONE_AFTER * timings.ttl}).fetchall()
    except psycopg.errors.UndefinedTable:  # no daemon ever ran on this schema
        conn.rollback()
        return LeadershipStatus(None, (), None)
    members = [Member(*m) for m in found]
    leader = leader_of(row)
    holder = row.holder if row is not None and leader is not None else None
    standbys = tuple(m for m in members if m.member != holder and m.role == Role.STANDBY)
    return LeadershipStatus(leader, standbys, row.db_now if row is not None else None)


# ---------------------------------------------------------------------------------- the daemon


class Leadership:
    """This daemon's part in the election, run as one asyncio task (`run`).

    `leading()` says whether work may start now; `wait_leading()` returns the epoch once this
    daemon leads; `wait_standing_by()` returns when it no longer does (deposed, lease lost, or
    released). The runtime polls and delivers only between the two, and passes the epoch to the
    store, whose every write transaction fences on it.
    """

    def __init__(
        self,
        url: str,
        schema: str,
        timings: LeaseTimings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        host: str | None = None,
        pid: int | None = None,
        on_role: Callable[[Role], None] | None = None,
    ) -> None:
        self.schema = schema
        self.timings = timings  # no default: the lease is `[state] lease`, and a silent 15 s would differ
        self.member = secrets.token_hex(8)  # new per process start: a restarted daemon is a new member
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self._conninfo = session_conninfo(url, self.timings, application_name("leadership", self.member))
        self._monotonic = monotonic
        self._sleep = sleep
        self._on_role = on_role
        self.role = Role.STANDBY
        self.epoch: int | None = None
        self.since: datetime | None = None
        self.leader: LeaderInfo | None = None  # as last seen by this daemon while standing by
        self.last_error: str | None = None
        self._trusted: float | None = None
        self._last_sent = -math.inf
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._ready = False  # tables made on this connection's database
        self._leading = asyncio.Event()
        self._standing = asyncio.Event()
        self._standing.set()
        self._abandoned: set[asyncio.Task[None]] = set()
        self._refused_signal = False  # said once: this role may not end another daemon's sessions

    # ------------------------------------------------------------------------ what others ask

    def leading(self) -> bool:
        return self.role is Role.LEADER and still_leading(self._monotonic(), self._trusted)

    async def wait_leading(self) -> int:
        while True:
            await self._leading.wait()
            if self.epoch is not None and self.leading():
                return self.epoch
            await asyncio.sleep(0)

    async def wait_standing_by(self) -> None:
        await self._standing.wait()

    # ---------------------------------------------------------------------------------- loop

    async def run(self) -> None:
        """Stand by, lead, renew, until cancelled (then the lease is released for a prompt handover)."""
        watchdog = asyncio.create_task(self._watchdog(), name="leadership-watchdog")
        try:
            while True:
                await self._tick()
                now = self._monotonic()
                await self._sleep(next_wait(self.role, now, self._last_sent, self._trusted, self.timings))
        finally:
            watchdog.cancel()
            with contextlib.suppress(BaseException):
                await watchdog
            await asyncio.shield(self._shutdown())

    async def _tick(self) -> None:
        leading = self.role is Role.LEADER
        try:
            conn = await self._bounded(self._connect())
            await self._bounded(self._renew(conn) if leading else self._stand_by(conn))
        except (psycopg.Error, TimeoutError, OSError) as exc:
            self.last_error = describe(exc)
            log.warning(
                "leadership: the database did not answer",
                role=str(self.role),
                error=self.last_error,
                schema=self.schema,
            )
            self._drop_connection()

    async def _bounded(self, work: Awaitable[T]) -> T:
        """`work` within op_timeout by the client's own clock, whatever the network does.

        A query cut off by a partition is cancelled, and psycopg then spends up to 10 s trying to
        cancel it on the server: that goes on in the background while this daemon moves on (the
        watchdog has already stopped work if the lease is at risk).
        """
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timings.op_timeout)
        except asyncio.CancelledError:
            # asyncio.wait leaves the work running: a takeover in hand would commit after run()
            # returned and promote a daemon that has stopped. It goes with us.
            self._abandon(task)
            raise
        if task in done:
            return task.result()
        self._abandon(task)
        raise TimeoutError

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        """Cancel a query in hand and give up its connection; _shutdown waits for both to end."""
        task.cancel()
        conn, self._conn = self._conn, None
        self._ready = False
        keeper = asyncio.create_task(_reap(task, conn))
        self._abandoned.add(keeper)
        keeper.add_done_callback(self._abandoned.discard)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop_connection()
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        if not self._ready:
            async with self._conn.transaction():
                # Two daemons starting at once would race on CREATE SCHEMA: one at a time.
                await self._conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"watcher:{self.schema}",))
                for statement in leadership_ddl(self.schema):
                    await self._conn.execute(statement)
            self._ready = True
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        # The next connection makes the tables again if need be: an operator may have dropped them.
        self._ready = False
        if conn is not None and not conn.closed:
            keeper = asyncio.create_task(_reap(None, conn))
            self._abandoned.add(keeper)
            keeper.add_done_callback(self._abandoned.discard)

    def _params(self, **extra: Any) -> dict[str, Any]:
        return {"member": self.member, "host": self.host, "pid": self.pid, "ttl": self.timings.ttl, **extra}

    async def _stand_by(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self._seen(conn)
        row = _row(await (await conn.execute(_q(_READ, self.schema))).fetchone())
        action = standby_action(row, self.member)
        self.leader = leader_of(row)
        if action is Action.WAIT:
            return
        sent = self._monotonic()
        self._last_sent = sent
        if action is Action.RESUME:
            # Our own lease, won or renewed by a query whose answer we never got (or after the
            # watchdog stepped down): the epoch unchanged means nobody led since, so renew it.
            assert row is not None
            cursor = await conn.execute(_q(_RENEW, self.schema), self._params(epoch=row.epoch))
            if await cursor.fetchone() is not None:
                self._promote(row.epoch, row.since, sent)
                await self._seen(conn)
            return
        if action is Action.CLAIM:
            won = await (await conn.execute(_q(_CLAIM, self.schema), self._params())).fetchone()
        else:
            assert row is not None
            await self._end_sessions_of(conn, row)
            async with conn.transaction():
                await conn.execute(_q(_LOCK, self.schema))
                cursor = await conn.execute(_q(_TAKE_OVER, self.schema), self._params(epoch=row.epoch))
                won = await cursor.fetchone()
        if won is not None:
            self._promote(int(won[0]), won[1], sent)
            await self._seen(conn)

    async def _end_sessions_of(self, conn: psycopg.AsyncConnection[Any], row: LeaseRow) -> None:
        """End the sessions the holder of the expired lease `row` left busy (`_TERMINATE` says why).

        Any failure (no privilege, an old server) leaves the takeover to wait for them, as before,
        and is said once per process.
        """
        names = [application_name(part, row.holder) for part in SESSION_PARTS]
        try:
            cursor = await conn.execute(_q(_TERMINATE, self.schema), {"names": names, "epoch": row.epoch})
            found = await cursor.fetchall()
            allowed = [int(pid) for pid, may in found if may]
            if allowed:
                await conn.execute(_SIGNAL, {"pids": allowed})
                log.warning(
                    "leadership: ended the sessions the previous leader left open (its lease expired)",
                    sessions=len(allowed),
                    previous_host=row.host,
                    previous_pid=row.pid,
                    epoch=row.epoch,
                    schema=self.schema,
                )
            if len(allowed) < len(found):
                self._cannot_signal(f"{len(found) - len(allowed)} session(s) of another role")
        except psycopg.Error as exc:
            if conn.broken:
                raise
            self._cannot_signal(describe(exc))

    def _cannot_signal(self, why: str) -> None:
        if self._refused_signal:
            return
        self._refused_signal = True
        log.warning(
            "leadership: cannot end the previous leader's sessions; a takeover waits for them to end "
            "(grant this role pg_signal_backend, or run every daemon as one role)",
            reason=why,
            schema=self.schema,
        )

    async def _renew(self, conn: psycopg.AsyncConnection[Any]) -> None:
        sent = self._monotonic()
        self._last_sent = sent
        cursor = await conn.execute(_q(_RENEW, self.schema), self._params(epoch=self.epoch))
        if await cursor.fetchone() is None:
            self._demote("another daemon took the lease over")
        elif self.role is Role.LEADER:  # the watchdog may have stepped down meanwhile: a new claim then
            self._trusted = trusted_until(sent, self.timings)
        await self._seen(conn)
        await conn.execute(_q(_FORGET_GONE, self.schema), {"gone": MEMBER_GONE_AFTER * self.timings.ttl})

    async def _seen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(_q(_SEEN, self.schema), self._params(role=str(self.role)))

    async def _watchdog(self) -> None:
        """Stop leading when the lease may end, by this host's monotonic clock, answer or no answer."""
        while True:
            await self._leading.wait()
            if self._trusted is None:
                await asyncio.sleep(0)
                continue
            remaining = self._trusted - self._monotonic()
            if remaining <= 0:
                self._demote("the lease could not be renewed in time")
            else:
                await self._sleep(remaining)

    def _promote(self, epoch: int, since: datetime, sent: float) -> None:
        self.role = Role.LEADER
        self.epoch = epoch
        self.since = since
        self._trusted = trusted_until(sent, self.timings)
        self.leader = None
        self._standing.clear()
        self._leading.set()
        log.info("leadership: this daemon leads", epoch=epoch, schema=self.schema, host=self.host)
        if self._on_role is not None:
            self._on_role(Role.LEADER)

    def _demote(self, why: str) -> None:
        if self.role is not Role.LEADER:
            return
        log.warning("leadership: this daemon stops leading", reason=why, epoch=self.epoch, schema=self.schema)
        self.role = Role.STANDBY
        self.epoch = None
        self.since = None
        self._trusted = None
        self._leading.clear()
        self._standing.set()
        if self._on_role is not None:
            self._on_role(Role.STANDBY)

    async def release(self) -> None:
        """Step down now (a clean stop): the lease ends at once, so a standby takes over at its next look."""
        epoch = self.epoch
        self._demote("stopping")
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return
        try:
            if epoch is not None:
                await self._bounded(conn.execute(_q(_RELEASE, self.schema), self._params(epoch=epoch)))
            if self._conn is not None:
                await self._bounded(self._conn.execute(_q(_GONE, self.schema), self._params()))
        except (psycopg.Error, TimeoutError, OSError) as exc:
            # The lease then ends on its own within ttl.
            log.warning("leadership: could not release the lease", error=describe(exc), schema=self.schema)

    async def _shutdown(self) -> None:
        await self.release()
        self._drop_connection()
        for keeper in list(self._abandoned):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(keeper, timeout=15)


async def _reap(task: asyncio.Task[Any] | None, conn: psycopg.AsyncConnection[Any] | None) -> None:
    """Let an abandoned query finish its cancellation, then close its connection."""
    if task is not None:
        with contextlib.suppress(BaseException):
            await task
    if conn is not None:
        with contextlib.suppress(BaseException):
            await conn.close()
