"""Takeover time of PostgreSQL leadership: from a leader's SIGKILL or partition to a standby leading.

    python -m bench.takeover [--runs 10] [--lease 15s | -c CONFIG]

The lease is `--lease` (a duration as in the configuration, within the same range), or the
`[state] lease` of the configuration given with `-c`, or the default.

Each run: a fresh database, a leader process making fenced writes (tests/support/leaders.py), a
standby; then either SIGKILL the leader, or cut it off through the silent proxy (no FIN, no
RST) in the middle of a fenced transaction. Prints median and worst of each, beside the bound
watcher.lease states, and for partitions how long before the takeover the cut-off leader stopped.
Leadership alone: the daemon's runtime around it is the integration's to measure.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import time
from collections.abc import Callable

import psycopg

from tests.support.daemon import wait_until
from tests.support.leaders import LeaderProcess, LeaderThread, writes_table
from tests.support.postgres import HOST, PORT, USER, Server, create_database, drop_database
from tests.support.tcpproxy import TcpProxy
from watcher.config import load_config, parse_lease
from watcher.errors import ConfigError
from watcher.leadership import fence, session_conninfo
from watcher.lease import DEFAULT_TTL, LeaseTimings

SCHEMA = "convertr_bench"


def has_led(thread: LeaderThread) -> Callable[[], bool]:
    """Whether `thread` has become leader, as recorded: leading() turns true a moment before the
    change is recorded (led_at), so waiting on it alone may read led_at() as None."""
    return lambda: thread.led_at() is not None


def kill_once(server: Server, ttl: float) -> float:
    db = create_database(server)
    try:
        writes_table(db.url, SCHEMA)
        leader = LeaderProcess(db.url, SCHEMA, ttl)
        standby = None
        try:
            leader.wait_for("leading", 5 * ttl)
            standby = LeaderThread(db.url, SCHEMA, ttl, "standby")
            leader.wait_for("committed", 5 * ttl)
            time.sleep(random.uniform(0, LeaseTimings(ttl).renew_every))  # any phase of the renewal cycle
            killed = time.monotonic()
            leader.proc.send_signal(signal.SIGKILL)
            wait_until(has_led(standby), 5 * ttl, "the standby to lead")
            return standby.led_at() - killed  # type: ignore[operator]
        finally:
            leader.end()
            if standby is not None:
                standby.stop()
    finally:
        drop_database(db)


def partition_once(server: Server, ttl: float) -> tuple[float, float]:
    """(takeover after the cut, how long before the takeover the cut-off leader had stopped)."""
    timings = LeaseTimings(ttl)
    db = create_database(server)
    try:
        writes_table(db.url, SCHEMA)
        with TcpProxy(server.host, server.port) as proxy:
            via = f"postgresql://{server.user}@{proxy.host}:{proxy.port}/{db.name}"
            leader = LeaderThread(via, SCHEMA, ttl, "leader")
            standby = None
            try:
                wait_until(leader.leading, 5 * ttl, "the leader")
                standby = LeaderThread(db.url, SCHEMA, ttl, "standby")
                store = psycopg.connect(session_conninfo(via, timings))
                store.execute("BEGIN")
                fence(store, SCHEMA, leader.leadership.epoch or 0)
                time.sleep(random.uniform(0, timings.renew_every))  # any phase of the renewal cycle
                cut = time.monotonic()
                proxy.blackhole()
                wait_until(has_led(standby), 5 * ttl, "the standby to lead")
                took, stopped = standby.led_at(), leader.stepped_down_at()
                assert took is not None and stopped is not None
                proxy.heal()
                store.close()
                return took - cut, took - stopped
            finally:
                proxy.heal()
                if standby is not None:
                    standby.stop()
                leader.stop()
    finally:
        drop_database(db)


def _lease_of(args: argparse.Namespace) -> float:
    if args.config is not None:
        pg = load_config(args.config, secrets_required=False).state.postgres
        if pg is None:
            raise ConfigError("state.url", "the configuration's state is SQLite: it has no lease")
        return pg.lease
    return DEFAULT_TTL if args.lease is None else parse_lease(args.lease, "--lease")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    lease = parser.add_mutually_exclusive_group()
    lease.add_argument("--lease", "--ttl", default=None, help=f"the lease (default {DEFAULT_TTL:g}s)")
    lease.add_argument("-c", "--config", help="take the lease from this configuration's [state] lease")
    args = parser.parse_args()
    try:
        args.ttl = _lease_of(args)
    except ConfigError as exc:
        parser.error(str(exc))
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(open("/dev/null", "w")))  # noqa: SIM115
    server = Server(HOST, PORT, USER)
    timings = LeaseTimings(args.ttl)
    kills = [kill_once(server, args.ttl) for _ in range(args.runs)]
    cuts = [partition_once(server, args.ttl) for _ in range(args.runs)]
    result = {
        "ttl_s": args.ttl,
        "bound_s": round(timings.takeover_bound, 2),
        "runs": args.runs,
        "kill_median_s": round(statistics.median(kills), 2),
        "kill_worst_s": round(max(kills), 2),
        "partition_median_s": round(statistics.median(c[0] for c in cuts), 2),
        "partition_worst_s": round(max(c[0] for c in cuts), 2),
        "partition_leader_stopped_before_takeover_min_s": round(min(c[1] for c in cuts), 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
