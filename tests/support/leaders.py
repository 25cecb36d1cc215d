"""Daemons in an election, for the leadership tests: in a thread of the test, or as a process to kill or pause.

`LeaderThread` runs one `Leadership` on an event loop of its own, so the test can block, signal
and read the database while it runs. `python -m tests.support.leaders URL SCHEMA TTL` is a
stand-in daemon in its own process: it takes part in the election and, while it leads, makes a
fenced write every 50 ms, printing one JSON line per step on stdout (`leading`, `in_tx`,
`committed`, `refused`, `failed`, `standing_by`), so a test can SIGKILL or SIGSTOP it at a known
point and see what it managed to commit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from watcher.errors import Deposed
from watcher.leadership import Leadership, fence_async, leadership_ddl, session_conninfo
from watcher.lease import LeaseTimings, Role

ROOT = Path(__file__).resolve().parent.parent.parent


def live_lease_pid(url: str, schema: str) -> int | None:
    """The pid holding a live lease, read straight from the database (None: no table, no row, expired)."""
    query = sql.SQL("SELECT pid FROM {}.leadership WHERE expires_at > clock_timestamp()").format(sql.Identifier(schema))
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute(query).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return None if row is None else int(row[0])


def another_hosts_lease(url: str, schema: str) -> None:
    """A live lease (epoch 4, pid 4242 on host-b, ten minutes left) held by a daemon on another host,
    written raw on purpose: no second daemon is needed to be led by one."""
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in leadership_ddl(schema):
            conn.execute(statement)
        conn.execute(
            f"INSERT INTO {schema}.leadership (name, epoch, holder, host, pid, since, renewed_at, expires_at) "
            "VALUES ('leader', 4, 'other', 'host-b', 4242, now(), now(), now() + interval '10 minutes') "
            "ON CONFLICT (name) DO UPDATE SET expires_at = EXCLUDED.expires_at, host = 'host-b', pid = 4242"
        )


def writes_table(url: str, schema: str) -> None:
    """The table the stand-in daemons write, in the state's schema."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.writes (n integer, epoch bigint, pid integer, "
                "written_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            ).format(sql.Identifier(schema))
        )


class LeaderThread:
    """One Leadership on its own event loop in a thread; role changes are timed by time.monotonic()."""

    def __init__(self, url: str, schema: str, ttl: float, name: str) -> None:
        self.changes: list[tuple[float, Role]] = []
        self.leadership = Leadership(url, schema, LeaseTimings(ttl), host=name, on_role=self._changed)
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"leader-{name}", daemon=True)
        self._thread.start()

    def _changed(self, role: Role) -> None:
        self.changes.append((time.monotonic(), role))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self.leadership.run())
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    def leading(self) -> bool:
        return self.leadership.leading()

    def led_at(self) -> float | None:
        """When this daemon last became leader (monotonic), None if it never did."""
        return next((t for t, role in reversed(self.changes) if role is Role.LEADER), None)

    def stepped_down_at(self) -> float | None:
        return next((t for t, role in reversed(self.changes) if role is Role.STANDBY), None)

    def stop(self) -> None:
        """A clean stop: the lease is released on the way out."""
        if self._task is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the leadership loop did not stop"


class LeaderProcess:
    """`python -m tests.support.leaders` in a subprocess, its JSON lines read by a thread."""

    def __init__(self, url: str, schema: str, ttl: float, *, hold: float = 0.0, ignore_lease: bool = False) -> None:
        args = [sys.executable, "-m", "tests.support.leaders", url, schema, str(ttl), "--hold", str(hold)]
        if ignore_lease:
            args.append("--ignore-lease")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            event["t"] = time.monotonic()
            self.lines.put(event)

    def wait_for(self, step: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {step!r} from the stand-in daemon in {timeout}s; saw {self.seen[-5:]}")
            try:
                event = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(event)
            if event["step"] == step:
                return event

    def drain(self) -> list[dict[str, Any]]:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()


# ------------------------------------------------------------------------- the stand-in daemon


def _say(step: str, **fields: Any) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


async def _daemon(url: str, schema: str, ttl: float, hold: float, ignore_lease: bool) -> None:
    timings = LeaseTimings(ttl)
    leadership = Leadership(url, schema, timings)
    election = asyncio.create_task(leadership.run())
    epoch = await leadership.wait_leading()
    _say("leading", epoch=epoch)
    conn = await psycopg.AsyncConnection.connect(session_conninfo(url, timings))
    insert = sql.SQL("INSERT INTO {}.writes (n, epoch, pid) VALUES (%s, %s, pg_backend_pid())").format(
        sql.Identifier(schema)
    )
    n = 0
    while True:
        n += 1
        if not ignore_lease and not leadership.leading():
            _say("standing_by")
            break
        try:
            async with conn.transaction():
                await fence_async(conn, schema, epoch)
                await conn.execute(insert, (n, epoch))
                _say("in_tx", n=n)
                if hold:
                    await asyncio.sleep(hold)
            _say("committed", n=n)
        except Deposed as exc:
            _say("refused", n=n, current=exc.current)
            break
        except psycopg.Error as exc:
            _say("failed", n=n, error=type(exc).__name__)
            if conn.closed or conn.broken:
                conn = await psycopg.AsyncConnection.connect(session_conninfo(url, timings))
            continue
        await asyncio.sleep(0.05)
    await conn.close()
    election.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await election


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("schema")
    parser.add_argument("ttl", type=float)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds each write transaction stays open")
    parser.add_argument("--ignore-lease", action="store_true", help="write without asking leading(): the fence alone")
    args = parser.parse_args()
    import structlog

    # stdout carries the JSON steps: the daemon's own log lines go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(_daemon(args.url, args.schema, args.ttl, args.hold, args.ignore_lease))


if __name__ == "__main__":
    main()
