"""The daemon on a PostgreSQL state (`[state] url`), end to end: the real CLI in a subprocess, the
simulator and a receiver over loopback, a real PostgreSQL database of the test's own."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.conftest import serving
from tests.support.daemon import WEBHOOK_KEY, Daemon, cli, wait_until, webhook_sink, write_config
from tests.support.leaders import another_hosts_lease
from tests.support.postgres import PG_PASSWORD, Database
from tests.support.receiver import Receiver
from watcher.exitcodes import EXIT_LOCKED
from watcher.lease import MIN_TTL, LeaseTimings
from watcher.simulator import Simulator, SimulatorServer

SCHEMA = "convertr_e2e"
LEASE = MIN_TTL  # `[state] lease` of every daemon here: the shortest allowed, so a takeover is quick
TIMINGS = LeaseTimings(LEASE)
SLACK = 15.0  # beyond a stated bound, for a loaded CI machine (two cores, several suites): not a speed check


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=5, campaigns=2, leads=12) as pair:
        yield pair


def _state(db: Database) -> dict[str, str]:
    # A password in the URL (trust authentication ignores it): it must reach no log line and no output.
    url = f"postgresql://{db.server.user}:{PG_PASSWORD}@{db.server.host}:{db.server.port}/{db.name}"
    return {"url": url, "schema": SCHEMA, "lease": f"{LEASE:g}s"}


def _config(tmp_path: Path, server: SimulatorServer, receiver: Receiver, db: Database) -> Path:
    return write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url)],
        leads={"start": "2000-01-01T00:00:00Z", "lookback": "1d"},
        state=_state(db),
    )


def test_once_on_postgresql_delivers_every_event_and_events_lists_them(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """`once` backfills every lead into the PostgreSQL state and delivers each as a verified webhook; `events
    --format json` lists the same ids as delivered; a second `once` sends nothing again; no SQLite file appears."""
    simulator, server = sim
    config = _config(tmp_path, server, receiver, postgres_db)
    result = cli("once", "-c", str(config))
    assert result.returncode == 0, result.stderr
    created = [e for e in receiver.verified_events(WEBHOOK_KEY) if e["type"] == "lead.created"]
    assert sorted(e["data"]["lead"]["id"] for e in created) == sorted(simulator.lead_ids())
    sent = set(receiver.event_ids())
    assert len(sent) == len(receiver.event_ids())

    listed = cli("events", "-c", str(config), "--format", "json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]  # one JSON object a line
    assert {r["id"] for r in rows} == sent
    assert {(r["sink"], r["status"]) for r in rows} == {("crm", "delivered")}

    again = cli("once", "-c", str(config))
    assert again.returncode == 0, again.stderr
    assert set(receiver.event_ids()) == sent and len(receiver.event_ids()) == len(sent)
    assert not list(tmp_path.glob("*.db*")), "a PostgreSQL state wrote an SQLite file"
    for output in (result, listed, again):
        assert PG_PASSWORD not in output.stdout + output.stderr

    status = cli("status", "-c", str(config), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["running"], report["role"]) == (False, None)  # `once` released its lease on the way out
    assert report["tracked_leads"] == len(simulator.lead_ids())
    assert [s["delivered"] for s in report["sinks"]] == [len(sent)]


def test_once_refuses_while_another_daemon_leads(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """With a live lease held by another daemon, `once` exits EXIT_LOCKED naming the leader, and neither
    asks Convertr nor delivers anything."""
    simulator, server = sim
    config = _config(tmp_path, server, receiver, postgres_db)
    another_hosts_lease(postgres_db.url, SCHEMA)
    requests_before = len(simulator.requests)
    result = cli("once", "-c", str(config))
    assert result.returncode == EXIT_LOCKED, result.stderr
    assert "led by another daemon (pid 4242 on host-b" in result.stderr
    assert receiver.requests == []
    assert len(simulator.requests) == requests_before
    status = json.loads(cli("status", "-c", str(config), "--json").stdout)
    assert (status["running"], status["role"]) == (True, "leader")
    assert status["leadership"]["leader"]["host"] == "host-b"


def test_run_leads_by_the_configured_lease_and_keeps_it_on_reload(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """`[state] lease = "3s"` reaches the election of a real `run`: each renewal sets the expiry 3 s past
    itself by the database clock, renewals come every lease/3, and `status --json` shows that expiry.
    A SIGHUP with another lease is refused naming `state.lease`; the daemon keeps leading by 3 s."""
    _, server = sim
    config = _config(tmp_path, server, receiver, postgres_db)
    lease = sql.SQL("SELECT renewed_at, expires_at, clock_timestamp() FROM {}.leadership").format(
        sql.Identifier(SCHEMA)
    )
    with Daemon(config) as daemon, psycopg.connect(postgres_db.url, autocommit=True) as conn:

        def row() -> tuple[datetime, datetime, datetime]:
            found = conn.execute(lease).fetchone()
            assert found is not None
            return found[0], found[1], found[2]

        def renewals(n: int) -> list[tuple[datetime, datetime, datetime]]:
            seen = [row()]
            for _ in range(n):
                last = seen[-1][0]
                wait_until(lambda last=last: row()[0] != last, TIMINGS.renew_every + SLACK, "a renewal")
                seen.append(row())
            return seen

        wait_until(lambda: (_status(config)["leadership"]["leader"] or {}).get("pid") == daemon.pid(), 30, "a leader")
        for renewed_at, expires_at, _ in renewals(3):
            assert (expires_at - renewed_at).total_seconds() == pytest.approx(LEASE, abs=0.05)
        shown = datetime.fromisoformat(_status(config)["leadership"]["leader"]["lease_expires_at"])
        renewed_at, expires_at, db_now = row()
        assert shown <= expires_at  # status read this renewal's expiry or an earlier one
        assert 0 < (shown - db_now).total_seconds() <= LEASE

        config.write_text(config.read_text().replace(f'lease = "{LEASE:g}s"', 'lease = "10s"'))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "state.lease: cannot change on reload" in daemon.log(), 20, "the reload refused")
        for renewed_at, expires_at, _ in renewals(2):
            assert (expires_at - renewed_at).total_seconds() == pytest.approx(LEASE, abs=0.05)
        assert daemon.stop() == 0


def _status(config: Path) -> Any:
    result = cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_run_on_postgresql_leads_delivers_and_a_second_stands_by(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """`run` takes the lease and delivers the backfill; a second `run` on the same configuration stands
    by (status lists it) and sends nothing; after the leader stops cleanly, the standby leads."""
    simulator, server = sim
    config = _config(tmp_path, server, receiver, postgres_db)
    with Daemon(config) as first:
        wait_until(lambda: len(set(receiver.event_ids())) >= len(simulator.lead_ids()), 30, "the backfill")
        sent = len(receiver.event_ids())
        with Daemon(config) as second:

            def roles() -> Any:
                return json.loads(cli("status", "-c", str(config), "--json").stdout)

            wait_until(lambda: len(roles()["leadership"]["standbys"]) == 1, 20, "the second daemon standing by")
            report = roles()
            assert report["role"] == "leader"
            assert report["leadership"]["leader"]["pid"] == first.pid()
            assert report["leadership"]["standbys"][0]["pid"] == second.pid()
            assert first.stop() == 0
            wait_until(
                lambda: (roles()["leadership"]["leader"] or {}).get("pid") == second.pid(),
                TIMINGS.takeover_bound + SLACK,
                "the takeover",
            )
            new = simulator.add_lead(simulator.campaign_ids()[0])["id"]
            wait_until(
                lambda: new in {e["data"]["lead"]["id"] for e in receiver.verified_events(WEBHOOK_KEY)},
                30,
                "the new lead delivered by the new leader",
            )
            assert second.stop() == 0
    assert len(receiver.event_ids()) == sent + 1
    assert len(set(receiver.event_ids())) == len(receiver.event_ids())


def test_a_standby_asks_convertr_nothing_and_leads_once_the_lease_expires(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """While another host's lease is live, `run` stands by (status lists it) without one Convertr request or
    delivery; when that lease ends (the other host died), it takes over with the next epoch and delivers."""
    simulator, server = sim
    config = _config(tmp_path, server, receiver, postgres_db)
    another_hosts_lease(postgres_db.url, SCHEMA)
    before = len(simulator.requests)
    with Daemon(config) as daemon:

        def report() -> Any:
            return json.loads(cli("status", "-c", str(config), "--json").stdout)

        wait_until(lambda: len(report()["leadership"]["standbys"]) == 1, 20, "the daemon standing by")
        assert report()["leadership"]["leader"]["host"] == "host-b"
        # Another of the standby's looks at the lease (every lease/5) and still nothing asked.
        seen = report()["leadership"]["standbys"][0]["seen_at"]
        wait_until(
            lambda: report()["leadership"]["standbys"][0]["seen_at"] != seen,
            TIMINGS.poll_every + SLACK,
            "another look at the lease",
        )
        assert len(simulator.requests) == before, "a standby asked Convertr"
        assert receiver.requests == []
        with psycopg.connect(postgres_db.url, autocommit=True) as conn:
            conn.execute(f"UPDATE {SCHEMA}.leadership SET expires_at = now()")  # host-b is gone
        wait_until(lambda: len(set(receiver.event_ids())) >= len(simulator.lead_ids()), 30, "the backfill")
        leader = report()["leadership"]["leader"]
        assert (leader["pid"], leader["epoch"]) == (daemon.pid(), 5)
        assert daemon.stop() == 0
    assert len(set(receiver.event_ids())) == len(receiver.event_ids())
