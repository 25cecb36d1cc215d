"""Process-level cases: the daemon as a user runs it (`convertr-watcher once`), each process timed
from Popen to exit, against a plain program (bench/plain.py) and apprise (bench/apprise_peer.py)
doing the same work. Every process is its own interpreter, as on a user's machine; the simulator
and the receiver are processes of their own too."""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.cases import SQLITE_STATE, webhook_sink, write_config
from bench.procs import child_env, receiver, simulator

PY = sys.executable
# A bound, not an expectation: a process-level case that hangs must fail, not stall `make bench`.
PROCESS_TIMEOUT = 3600.0


# --- running one process ----------------------------------------------------------------------


def timed(cmd: list[str], folder: Path, timeout: float = PROCESS_TIMEOUT) -> float:
    """Seconds from Popen to exit of `cmd`; RuntimeError with its stderr when it exits non-zero."""
    err = folder / "stderr.txt"
    with err.open("wb") as sink:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sink, env=child_env(), cwd=folder)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{' '.join(cmd[1:4])} still running after {timeout:.0f}s: killed") from None
        elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} exited {code}: {err.read_text()[-2000:]}")
    return elapsed


def fresh(tmp: Path) -> Path:
    """A new empty folder under `tmp`, so every run starts with no state file."""
    return Path(tempfile.mkdtemp(dir=tmp))


def daemon_once(
    api: str, url: str, tmp: Path, concurrency: int, folder: Path | None = None, state: str = SQLITE_STATE
) -> float:
    """`python -m watcher once -c cfg`: backfill from 2000-01-01 into one webhook sink, one delivery
    pass; `state` is the `[state]` table's body (the SQLite file state.db in `folder` by default)."""
    folder = folder or fresh(tmp)
    sinks = webhook_sink(url, concurrency=concurrency)
    config = write_config(folder, api, sinks=sinks, state=state)
    return timed([PY, "-m", "watcher", "once", "-c", str(config)], folder)


def plain_once(api: str, url: str, n: int, tmp: Path, concurrency: int) -> float:
    """`python -m bench.plain`: the same walk and the same signed POSTs, by hand."""
    return timed([PY, "-m", "bench.plain", api, url, str(n), str(concurrency)], fresh(tmp))


def apprise_once(api: str, url: str, n: int, tmp: Path) -> float:
    """`python -m bench.apprise_peer`: the same walk, then one apprise notify per lead."""
    return timed([PY, "-m", "bench.apprise_peer", api, url, str(n)], fresh(tmp))


# --- what the receiver saw --------------------------------------------------------------------


def log_end(log: Path) -> int:
    """The receiver log's size now: where the next run's lines start."""
    return log.stat().st_size if log.exists() else 0


def lines_since(log: Path, offset: int) -> list[list[str]]:
    """The `<webhook-id> <lead> <monotonic>` lines the receiver wrote after `offset`, split."""
    with log.open("rb") as f:
        f.seek(offset)
        return [line.split() for line in f.read().decode().splitlines()]


def check_ids(log: Path, offset: int, n: int, who: str) -> list[list[str]]:
    """Fail unless exactly `n` distinct webhook-ids arrived since `offset` (a retry may repeat one)."""
    lines = lines_since(log, offset)
    ids = {parts[0] for parts in lines}
    if len(ids) != n or "None" in ids:
        raise RuntimeError(f"{who}: the receiver saw {len(ids)} distinct webhook-ids in {len(lines)} requests, not {n}")
    return lines


def check_count(log: Path, offset: int, n: int, who: str) -> None:
    """Fail unless exactly `n` requests arrived since `offset` (apprise sends no webhook-id)."""
    count = len(lines_since(log, offset))
    if count != n:
        raise RuntimeError(f"{who}: the receiver saw {count} requests, not {n}")


def arrival_rate(lines: list[list[str]]) -> float:
    """Requests per second between the first and the last arrival: the delivery phase alone."""
    stamps = sorted(float(parts[2]) for parts in lines)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


# --- the cases --------------------------------------------------------------------------------


def backfill(n: int, runs: int, concurrency: int = 4, delay: float = 0.0) -> dict[str, float]:
    """Daemon `once` against the plain program, each against a freshly started simulator holding
    `n` leads (a real Convertr renders every page anew), both delivering to one receiver."""
    once_s, plain_s, once_rate = [], [], []
    with tempfile.TemporaryDirectory() as tmp, receiver(Path(tmp) / "recv.log", delay) as url:
        log = Path(tmp) / "recv.log"
        for _ in range(runs):
            with simulator(n) as api:
                offset = log_end(log)
                once_s.append(daemon_once(api, url, Path(tmp), concurrency))
                once_rate.append(arrival_rate(check_ids(log, offset, n, "once")))
            with simulator(n) as api:
                offset = log_end(log)
                plain_s.append(plain_once(api, url, n, Path(tmp), concurrency))
                check_ids(log, offset, n, "plain")
    once, plain = statistics.median(once_s), statistics.median(plain_s)
    return {
        "once_s": once,
        "plain_s": plain,
        "ratio": plain / once,
        "events_per_s": n / once,
        "delivery_events_per_s": statistics.median(once_rate),
    }


def apprise_peer(n: int, runs: int, concurrency: int = 4) -> dict[str, float]:
    """Apprise sending the backfill one notify at a time against daemon `once` in the same runs."""
    apprise_s, once_s = [], []
    with tempfile.TemporaryDirectory() as tmp, receiver(Path(tmp) / "recv.log") as url:
        log = Path(tmp) / "recv.log"
        for _ in range(runs):
            with simulator(n) as api:
                offset = log_end(log)
                once_s.append(daemon_once(api, url, Path(tmp), concurrency))
                check_ids(log, offset, n, "once")
            with simulator(n) as api:
                offset = log_end(log)
                apprise_s.append(apprise_once(api, url, n, Path(tmp)))
                check_count(log, offset, n, "apprise")
    peer, once = statistics.median(apprise_s), statistics.median(once_s)
    return {"apprise_s": peer, "once_s": once, "speedup": peer / once}


# --- PostgreSQL state beside SQLite -----------------------------------------------------------

PG_SCHEMA = "convertr_bench"


def _pg_state_bytes(url: str, schema: str) -> int:
    """Bytes of the schema's tables on disk, their indexes and TOAST included."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r', 'p')",
            (schema,),
        ).fetchone()
    return int(row[0]) if row else 0


def postgres_backfill(n: int, runs: int, concurrency: int = 4) -> dict[str, float]:
    """`once` with its state in SQLite against the same `once` with its state in PostgreSQL (a fresh
    database per run, dropped after it), each against a freshly started simulator holding `n` leads,
    both delivering to one receiver; state bytes per lead of each."""
    from tests.support.postgres import HOST, PORT, USER, Server, create_database, drop_database

    server = Server(HOST, PORT, USER)
    sqlite_s, pg_s, sqlite_bytes, pg_bytes = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp, receiver(Path(tmp) / "recv.log") as url:
        log = Path(tmp) / "recv.log"
        for _ in range(runs):
            with simulator(n) as api:
                offset = log_end(log)
                folder = fresh(Path(tmp))
                sqlite_s.append(daemon_once(api, url, Path(tmp), concurrency, folder))
                check_ids(log, offset, n, "once (SQLite)")
                # The process closed its store: SQLite checkpointed the WAL into the file then.
                sqlite_bytes.append(sum(p.stat().st_size for p in folder.glob("state.db*")) / n)
            db = create_database(server)
            try:
                with simulator(n) as api:
                    offset = log_end(log)
                    state = f'url = "{db.url}"\nschema = "{PG_SCHEMA}"'
                    pg_s.append(daemon_once(api, url, Path(tmp), concurrency, state=state))
                    check_ids(log, offset, n, "once (PostgreSQL)")
                    pg_bytes.append(_pg_state_bytes(db.url, PG_SCHEMA) / n)
            finally:
                drop_database(db)
    sqlite, pg = statistics.median(sqlite_s), statistics.median(pg_s)
    return {
        "sqlite_s": sqlite,
        "postgres_s": pg,
        "ratio": sqlite / pg,
        "sqlite_bytes_per_lead": statistics.median(sqlite_bytes),
        "postgres_bytes_per_lead": statistics.median(pg_bytes),
    }


def takeover(runs: int) -> dict[str, float]:
    """Seconds from SIGKILL of a leader process to a standby leading, default lease, `runs` times."""
    from bench.takeover import kill_once
    from tests.support.postgres import HOST, PORT, USER, Server
    from watcher.lease import DEFAULT_TTL, LeaseTimings

    timings = LeaseTimings(DEFAULT_TTL)  # the default lease, on purpose: what an unconfigured deployment gets
    kills = [kill_once(Server(HOST, PORT, USER), timings.ttl) for _ in range(runs)]
    return {
        "ttl_s": timings.ttl,
        "bound_s": timings.takeover_bound,
        "median_s": statistics.median(kills),
        "worst_s": max(kills),
    }


# --- cheap start ------------------------------------------------------------------------------


class FirstRequest:
    """A stub API on 127.0.0.1 in this process: stamps time.monotonic() of the first request it
    receives and answers every request 503. CLOCK_MONOTONIC is system-wide on Linux, so the stamp
    compares with a time taken here before spawning the client."""

    def __init__(self) -> None:
        self.stamp: float | None = None
        self.seen = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                if stub.stamp is None:
                    stub.stamp = time.monotonic()
                    stub.seen.set()
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            do_GET = do_POST = answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextlib.contextmanager
    def serving(self) -> Iterator[FirstRequest]:
        """Serve from a thread until the block ends."""
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()

    def time_to_first(self, cmd: list[str], folder: Path, timeout: float = 60) -> float:
        """Milliseconds from spawning `cmd` to its first request here; the process is killed then."""
        self.stamp = None
        self.seen.clear()
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), cwd=folder)
        try:
            if not self.seen.wait(timeout):
                raise RuntimeError(f"{' '.join(cmd[1:4])} made no request within {timeout}s")
        finally:
            proc.kill()
            proc.wait()
        assert self.stamp is not None
        return (self.stamp - started) * 1000


def start(runs: int) -> dict[str, float]:
    """Spawn to first API request: `python -m watcher once -c cfg` against
    `python -c "import httpx; httpx.get(URL)"`, each process killed once it has asked."""
    daemon_ms, plain_ms = [], []
    with tempfile.TemporaryDirectory() as tmp, FirstRequest().serving() as stub:
        for _ in range(runs):
            folder = fresh(Path(tmp))
            config = write_config(folder, stub.url, sinks=webhook_sink("http://127.0.0.1:9/hook"))
            daemon_ms.append(stub.time_to_first([PY, "-m", "watcher", "once", "-c", str(config)], folder))
            one_liner = f"import httpx; httpx.get({stub.url + '/api/v4/leads'!r})"
            plain_ms.append(stub.time_to_first([PY, "-c", one_liner], fresh(Path(tmp))))
    daemon, plain = statistics.median(daemon_ms), statistics.median(plain_ms)
    return {"daemon_ms": daemon, "plain_ms": plain, "overhead_ms": daemon - plain}
