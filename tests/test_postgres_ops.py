"""Operating a daemon on a PostgreSQL state: what a standby shows to probes and scrapes, `check --state`,
and the least privileges the operations guide grants. The real CLI in subprocesses, a real PostgreSQL
database of the test's own."""

from __future__ import annotations

import http.client
import itertools
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import serving
from tests.support.daemon import Daemon, cli, healthz, wait_until, webhook_sink, write_config
from tests.support.leaders import another_hosts_lease
from tests.support.postgres import PG_PASSWORD, Database
from tests.support.receiver import Receiver
from tests.test_service import NotifySocket
from watcher.simulator import Simulator, SimulatorServer

SCHEMA = "convertr_ops"
WATCHDOG_USEC = 2_000_000  # systemd would abort after 2 s without a ping


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=7, campaigns=1, leads=4) as pair:
        yield pair


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _state(db: Database, schema: str = SCHEMA) -> dict[str, str]:
    # A password in the URL (trust authentication ignores it): no output may show it.
    url = f"postgresql://{db.server.user}:{PG_PASSWORD}@{db.server.host}:{db.server.port}/{db.name}"
    return {"url": url, "schema": schema}


def metrics_of(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        answer = conn.getresponse()
        assert answer.status == 200
        return answer.read().decode()
    finally:
        conn.close()


def leader_gauge(port: int) -> float | None:
    found = re.search(rf'^watcher_leader\{{state="{SCHEMA}"\}} (\S+)$', metrics_of(port), re.M)
    return float(found.group(1)) if found else None


def status(config: Path) -> dict[str, Any]:
    result = cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_a_standby_serves_metrics_saying_it_does_not_lead_stays_healthy_and_feeds_the_watchdog(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """Standing by behind another host's live lease, `run` answers /metrics with `watcher_leader 0` and
    /healthz with 200, and pings systemd's watchdog steadily (WatchdogSec= would abort it otherwise),
    without one Convertr request. Once that lease ends it leads, and the same port says
    `watcher_leader 1`."""
    simulator, server = sim
    port = free_port()
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url)],
        state=_state(postgres_db),
        extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n',
    )
    another_hosts_lease(postgres_db.url, SCHEMA)
    before = len(simulator.requests)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        with Daemon(config, env=env) as daemon:
            wait_until(lambda: len(status(config)["leadership"]["standbys"]) == 1, 20, "the daemon standing by")
            assert leader_gauge(port) == 0.0
            assert healthz(port) == (200, "ok\n")
            first = notify.wait_for(lambda m: "WATCHDOG" in m, 10, "a watchdog ping while standing by")
            notify.wait_for(lambda m: "WATCHDOG" in m and notify.count("WATCHDOG", first) >= 5, 10, "steady pings")
            pings = [t for t, m in notify.messages[first:] if "WATCHDOG" in m]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert max(gaps) < WATCHDOG_USEC / 1e6, f"systemd would have aborted the standby: gaps {gaps}"
            assert len(simulator.requests) == before, "a standby asked Convertr"
            assert daemon.running()

            with psycopg.connect(postgres_db.url, autocommit=True) as conn:
                conn.execute(f"UPDATE {SCHEMA}.leadership SET expires_at = now()")  # host-b is gone
            wait_until(lambda: leader_gauge(port) == 1.0, 30, "watcher_leader 1 once it leads")
            assert status(config)["leadership"]["leader"]["host"] != "host-b"
            assert daemon.stop() == 0
        assert PG_PASSWORD not in daemon.log()
    finally:
        notify.close()
