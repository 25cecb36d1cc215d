"""A second outsider's attack on the PostgreSQL leadership (issue 21): each test is a fault it confirmed.

Real PostgreSQL, real `convertr-watcher run` processes, the simulator, a TCP proxy for network faults.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import serving
from tests.support.daemon import Daemon, wait_until, webhook_sink, write_config
from tests.support.leaders import live_lease_pid
from tests.support.postgres import Database
from tests.support.receiver import Receiver
from tests.support.tcpproxy import TcpProxy
from watcher.lease import MIN_TTL, LeaseTimings
from watcher.simulator import Simulator, SimulatorServer

SCHEMA = "convertr_attack2"
LEASE = MIN_TTL
TIMINGS = LeaseTimings(LEASE)
PATIENCE = TIMINGS.takeover_bound + 20


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=7, campaigns=2, leads=4) as pair:
        yield pair


def _config(folder: Path, server: SimulatorServer, receiver: Receiver, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(
        folder,
        server.url,
        [webhook_sink(receiver.url)],
        leads={"start": "2000-01-01T00:00:00Z", "lookback": "1d"},
        state={"url": url, "schema": SCHEMA, "lease": f"{LEASE:g}s"},
    )


def _member_of(db: Database, pid: int) -> str | None:
    query = sql.SQL("SELECT member FROM {}.leadership_members WHERE pid = %s").format(sql.Identifier(SCHEMA))
    try:
        with psycopg.connect(db.url, connect_timeout=5) as conn:
            row = conn.execute(query, (pid,)).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return None if row is None else str(row[0])


def _daemon(config: Path, name: str) -> Daemon:
    daemon = Daemon(config)
    daemon.log_path = config.parent / f"daemon-{name}.log"
    return daemon


def test_a_daemon_that_wins_the_lease_while_its_store_cannot_connect_stands_by_instead_of_exiting(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """The standby takes the lease over, then the network goes silent as its term's store connects:
    the term cannot start. A database blip is no reason for `run` to exit: it stands by (or leads)
    again once the network heals."""
    _, server = sim
    db = postgres_db.server
    with TcpProxy(db.host, db.port) as proxy:
        via_proxy = f"postgresql://{db.user}@{proxy.host}:{proxy.port}/{postgres_db.name}"
        config_a = _config(tmp_path / "a", server, receiver, postgres_db.url)
        config_b = _config(tmp_path / "b", server, receiver, via_proxy)
        with _daemon(config_a, "a") as a:
            wait_until(lambda: live_lease_pid(postgres_db.url, SCHEMA) == a.pid(), PATIENCE, "a to lead")
            with _daemon(config_b, "b") as b:
                member = wait_until(lambda: _member_of(postgres_db, b.pid()), PATIENCE, "b standing by")
                proxy.blackhole_after(f"convertr-watcher state {member}".encode())  # b's term's store connecting
                a.stop(signal.SIGKILL)
                wait_until(lambda: proxy.silenced_at or not b.running(), PATIENCE, "b's term to open its store")
                time.sleep(TIMINGS.ttl)
                proxy.heal()
                wait_until(
                    lambda: live_lease_pid(postgres_db.url, SCHEMA) == b.pid() or not b.running(),
                    PATIENCE,
                    "b to lead again",
                )
                assert b.running(), b.log()[-3000:]
                wait_until(lambda: '"event": "started"' in b.log(), PATIENCE, "b's term to start")
                assert b.stop() == 0, b.log()[-3000:]


def _posts(receiver: Receiver) -> int:
    return len([r for r in receiver.requests if r.method == "POST"])


def test_a_configuration_reloaded_while_leading_still_applies_in_the_next_term(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """The operator moves the sink to a new URL and sends SIGHUP: the leader applies it. The daemon is
    then paused past its lease (nobody else stands by), stops leading, and leads again: the new term
    must run on the configuration in force, not on the one read at start, which would send events
    to the endpoint the operator removed."""
    simulator, server = sim
    with Receiver() as moved_to:
        config = _config(tmp_path, server, receiver, postgres_db.url)
        with Daemon(config) as daemon:
            wait_until(lambda: _posts(receiver) >= len(simulator.lead_ids()), PATIENCE, "the backfill")
            text = config.read_text()
            assert receiver.url in text
            config.write_text(text.replace(receiver.url, moved_to.url))
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "SIGHUP: reloading" in daemon.log(), PATIENCE, "the reload")
            campaign = simulator.campaign_ids()[0]
            simulator.add_lead(campaign)
            wait_until(lambda: _posts(moved_to) >= 1, PATIENCE, "a delivery to the new URL")
            before = _posts(receiver)

            daemon.proc.send_signal(signal.SIGSTOP)  # past the lease: its watchdog ends the term at SIGCONT
            time.sleep(TIMINGS.ttl + 1)
            daemon.proc.send_signal(signal.SIGCONT)
            wait_until(
                lambda: daemon.log().count('"event": "started"') >= 2 or not daemon.running(), PATIENCE, "term 2"
            )
            simulator.add_lead(campaign)
            wait_until(lambda: _posts(moved_to) >= 2 or _posts(receiver) > before, PATIENCE, "the next delivery")
            assert _posts(receiver) == before, "the second term delivered to the URL the operator had moved away from"
            assert daemon.stop() == 0, daemon.log()[-3000:]


def test_a_standby_sent_sighup_takes_over_on_the_configuration_it_was_told_to_load(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """The operator moves the sink to a new URL and sends SIGHUP to both daemons on the configuration,
    as to any pair. The leader applies it; the standby must too, or the first failover sends events
    to the endpoint the operator removed."""
    simulator, server = sim
    with Receiver() as moved_to:
        config = _config(tmp_path, server, receiver, postgres_db.url)
        with _daemon(config, "a") as a:
            wait_until(lambda: live_lease_pid(postgres_db.url, SCHEMA) == a.pid(), PATIENCE, "a to lead")
            with _daemon(config, "b") as b:
                wait_until(lambda: _member_of(postgres_db, b.pid()), PATIENCE, "b standing by")
                wait_until(lambda: _posts(receiver) >= len(simulator.lead_ids()), PATIENCE, "the backfill")
                config.write_text(config.read_text().replace(receiver.url, moved_to.url))
                for daemon in (a, b):
                    assert daemon.proc is not None
                    daemon.proc.send_signal(signal.SIGHUP)
                wait_until(lambda: "SIGHUP" in a.log() and "SIGHUP" in b.log(), PATIENCE, "both to hear SIGHUP")
                before = _posts(receiver)
                a.stop(signal.SIGKILL)
                wait_until(lambda: live_lease_pid(postgres_db.url, SCHEMA) == b.pid(), PATIENCE, "b to take over")
                simulator.add_lead(simulator.campaign_ids()[0])
                wait_until(lambda: _posts(moved_to) >= 1 or _posts(receiver) > before, PATIENCE, "the next delivery")
                assert _posts(receiver) == before, (
                    "the new leader delivered to the URL the operator had moved away from"
                )
                assert b.running(), b.log()[-3000:]
                assert b.stop() == 0, b.log()[-3000:]


def test_a_standby_refuses_an_invalid_configuration_on_sighup_and_leads_on_the_one_in_force(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """The other side of reading the file on SIGHUP while standing by: a broken file, or one that
    changes the lease, is refused in one line and the standby later leads on the configuration in force."""
    simulator, server = sim
    config = _config(tmp_path, server, receiver, postgres_db.url)
    good = config.read_text()
    with _daemon(config, "a") as a:
        wait_until(lambda: live_lease_pid(postgres_db.url, SCHEMA) == a.pid(), PATIENCE, "a to lead")
        with _daemon(config, "b") as b:
            wait_until(lambda: _member_of(postgres_db, b.pid()), PATIENCE, "b standing by")
            assert b.proc is not None
            for bad, says in (("[sinks\n", "REFUSED"), (good.replace('lease = "3s"', 'lease = "4s"'), "state.lease")):
                config.write_text(bad)
                b.proc.send_signal(signal.SIGHUP)
                wait_until(lambda says=says: says in b.log(), PATIENCE, f"the standby to refuse ({says})")
            config.write_text(good)
            a.stop(signal.SIGKILL)
            wait_until(lambda: live_lease_pid(postgres_db.url, SCHEMA) == b.pid(), PATIENCE, "b to take over")
            wait_until(lambda: _posts(receiver) >= len(simulator.lead_ids()), PATIENCE, "deliveries by b")
            assert b.running(), b.log()[-3000:]
            assert b.stop() == 0, b.log()[-3000:]
