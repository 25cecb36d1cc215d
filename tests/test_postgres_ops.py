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
from tests.support.daemon import WEBHOOK_KEY, Daemon, cli, healthz, wait_until, webhook_sink, write_config
from tests.support.faketime import faketime_env
from tests.support.leaders import another_hosts_lease
from tests.support.postgres import PG_PASSWORD, Database
from tests.support.receiver import Receiver
from tests.test_clock_steps import _created
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


def _polls(config: Path) -> int:
    return sum(st["polls"] for st in status(config)["streams"] if st["stream"] == "leads.created")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_check_state_on_postgresql_says_it_answers_its_version_and_who_leads(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """`check --state` on a PostgreSQL state: before any daemon, that there is no state yet; after `once`,
    the schema version and the streams with a cursor, and who leads (nobody, then another host's live
    lease); exit 0 each time, the URL shown with host, port and database only."""
    from watcher.state.postgres import MIGRATIONS

    _simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], state=_state(postgres_db))
    where = f"postgresql://{postgres_db.server.host}:{postgres_db.server.port}/{postgres_db.name} (schema {SCHEMA})"

    fresh = cli("check", "-c", str(config), "--state")
    assert fresh.returncode == 0, fresh.stderr
    assert f"state: {where} answers; no state there yet (the first daemon to lead makes it)" in _lines(fresh.stdout)
    assert "leader: none (no daemon leads now)" in _lines(fresh.stdout)

    assert cli("once", "-c", str(config)).returncode == 0
    after = cli("check", "-c", str(config), "--state")
    assert after.returncode == 0, after.stderr
    assert f"state: {where} answers; schema version {len(MIGRATIONS)}; 1 streams with a cursor" in _lines(after.stdout)
    assert "leader: none (no daemon leads now)" in _lines(after.stdout)

    another_hosts_lease(postgres_db.url, SCHEMA)
    led = cli("check", "-c", str(config), "--state")
    assert led.returncode == 0, led.stderr
    assert any(re.match(r"leader: pid 4242 on host-b, epoch \d+, since \d{4}-", line) for line in _lines(led.stdout))
    for result in (fresh, after, led):
        assert PG_PASSWORD not in result.stdout + result.stderr
        assert postgres_db.server.user + ":" not in result.stdout + result.stderr


def test_check_state_on_postgresql_fails_in_one_clear_line(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """Nothing listening: exit 1 and one line saying the connection was refused; a database that does not
    exist: exit 1 naming it; a schema a newer release made: exit 78. No traceback, no credentials."""
    _simulator, server = sim
    closed = free_port()
    db = postgres_db
    gone = {"url": f"postgresql://{db.server.user}:{PG_PASSWORD}@127.0.0.1:{closed}/{db.name}", "schema": SCHEMA}
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], state=gone)
    refused = cli("check", "-c", str(config), "--state")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"convertr-watcher: cannot check the state in postgresql://127.0.0.1:{closed}/{db.name} "
        f"(schema {SCHEMA}): cannot connect: Connection refused"
    )

    missing = {"url": f"postgresql://{db.server.user}:{PG_PASSWORD}@{db.server.host}:{db.server.port}/nodb_{db.name}"}
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], state={**missing, "schema": SCHEMA})
    absent = cli("check", "-c", str(config), "--state")
    assert absent.returncode == 1
    assert len(absent.stderr.strip().splitlines()) == 1
    assert f'database "nodb_{db.name}" does not exist' in absent.stderr

    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], state=_state(db))
    assert cli("once", "-c", str(config)).returncode == 0
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(f"UPDATE {SCHEMA}.state_meta SET version = version + 1")
    newer = cli("check", "-c", str(config), "--state")
    assert newer.returncode == 78
    assert len(newer.stderr.strip().splitlines()) == 1
    assert "newer than this release knows" in newer.stderr
    for result in (refused, absent, newer):
        assert "Traceback" not in result.stderr
        assert PG_PASSWORD not in result.stdout + result.stderr


def test_a_step_back_while_no_daemon_led_a_postgresql_state_does_not_hold_a_waiting_retry(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """The clock frame on PostgreSQL: the leader stops with a retry due in seconds; the host's clock goes
    back an hour before it leads again (same boot): the retry is sent within seconds, not in an hour,
    and the log says the clock stepped while it was not leading. (The frame is a row in the state, not
    a file: there is no file beside a PostgreSQL state.)"""
    simulator, server = sim
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    config = write_config(
        tmp_path, server.url, [webhook_sink(receiver.url, retry_schedule=["3s"] * 5)], state=_state(postgres_db)
    )
    daemon = Daemon(config, env=faketime_env(offset))
    with daemon:
        wait_until(lambda: _polls(config) >= 2, 30, "the daemon leading and polling")
        receiver.respond(500)
        waiting = set(simulator.add_leads(1, simulator.campaign_ids()[0]))
        wait_until(lambda: "delivery failed" in daemon.log(), 20, "the failed attempt recorded")
        assert daemon.stop() == 0
    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*) FROM {SCHEMA}.clock_frame").fetchone() == (1,)
    receiver.respond(200)
    offset.write_text("-3600\n")
    with daemon:
        wait_until(lambda: waiting <= _created(receiver), 20, "the retry after the step")
        assert daemon.stop() == 0
    assert "the host clock stepped while this daemon was not leading" in daemon.log()
    assert list(tmp_path.glob("*.clock.json")) == []
    # The frame is the daemons' bookkeeping, not state: copy-state leaves it behind instead of refusing it.
    copied = cli("copy-state", "-c", str(config), "--to", str(tmp_path / "copy.db"))
    assert copied.returncode == 0, copied.stderr


# The least privileges of docs/operations-postgres.md, section "The database role": kept word for word
# in step with it (test_the_guide_states_these_grants checks the guide holds each statement).
PREMADE_SCHEMA_GRANTS = (
    "REVOKE ALL ON DATABASE {db} FROM PUBLIC",
    "GRANT CONNECT ON DATABASE {db} TO {role}",
    "CREATE SCHEMA {schema} AUTHORIZATION {role}",
)
OWN_SCHEMA_GRANTS = (
    "REVOKE ALL ON DATABASE {db} FROM PUBLIC",
    "GRANT CONNECT, CREATE ON DATABASE {db} TO {role}",
)
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "operations-postgres.md"


@pytest.fixture
def role(postgres_db: Database) -> Iterator[str]:
    """A login role of this test's own with no privilege at all yet (roles are cluster-wide: dropped after)."""
    name = f"watcher_{postgres_db.name[-12:]}"
    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN NOINHERIT")
        # PostgreSQL 15 gives PUBLIC no CREATE on schema public; say it anyway, for older clusters.
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
    try:
        yield name
    finally:
        with psycopg.connect(postgres_db.url, autocommit=True) as conn:
            conn.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'")
            conn.execute(f"DROP OWNED BY {name} CASCADE")
        with psycopg.connect(postgres_db.server.url("postgres"), autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {name} CASCADE")
            conn.execute(f"DROP ROLE {name}")


def _grant(db: Database, statements: tuple[str, ...], role: str, schema: str) -> None:
    with psycopg.connect(db.url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.format(db=db.name, role=role, schema=schema))


def _as(db: Database, role: str, schema: str) -> dict[str, str]:
    return {"url": f"postgresql://{role}@{db.server.host}:{db.server.port}/{db.name}", "schema": schema}


def test_the_guide_states_these_grants() -> None:
    text = GUIDE.read_text()
    for statement in PREMADE_SCHEMA_GRANTS + OWN_SCHEMA_GRANTS:
        shown = statement.format(db="convertr", role="convertr_watcher", schema="convertr_acme")
        assert shown in text, f"the guide no longer says: {shown}"


def test_the_least_privileges_of_the_guide_suffice_for_run_status_check_and_forget(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database, role: str
) -> None:
    """A role given only CONNECT on the database and a schema of its own (the guide's first way) runs the
    daemon: it leads, backfills and delivers, `status` and `check --state` read it, `forget` erases (and
    VACUUMs, which needs the tables' ownership). The guide's second way (CONNECT and CREATE on the
    database, no schema made) lets `once` make its schema and deliver. A role with CONNECT alone is
    refused in one line naming the privilege."""
    simulator, server = sim
    _grant(postgres_db, PREMADE_SCHEMA_GRANTS, role, SCHEMA)
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url)],
        leads={"start": "2000-01-01T00:00:00Z", "lookback": "1d"},
        state=_as(postgres_db, role, SCHEMA),
    )
    with Daemon(config) as daemon:
        wait_until(lambda: len(set(receiver.event_ids())) >= len(simulator.lead_ids()), 30, "the backfill")
        report = status(config)
        assert (report["running"], report["role"]) == (True, "leader")
        checked = cli("check", "-c", str(config), "--state")
        assert checked.returncode == 0, checked.stderr
        assert "streams with a cursor" in checked.stdout
        assert daemon.stop() == 0
    assert "permission denied" not in daemon.log().lower()
    lead = simulator.lead_ids()[0]
    erased = cli("forget", "-c", str(config), "--lead", str(lead))
    assert erased.returncode == 0, erased.stderr

    other = tmp_path / "own"
    other.mkdir()
    _grant(postgres_db, OWN_SCHEMA_GRANTS, role, "unused")
    own = write_config(
        other,
        server.url,
        [webhook_sink(receiver.url)],
        leads={"start": "2000-01-01T00:00:00Z", "lookback": "1d"},
        state=_as(postgres_db, role, "convertr_own"),
    )
    result = cli("once", "-c", str(own))
    assert result.returncode == 0, result.stderr
    assert status(own)["streams"]

    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        conn.execute(f"REVOKE CREATE ON DATABASE {postgres_db.name} FROM {role}")
    bare = tmp_path / "bare"
    bare.mkdir()
    refused_config = write_config(
        bare, server.url, [webhook_sink(receiver.url)], state=_as(postgres_db, role, "convertr_bare")
    )
    refused = cli("once", "-c", str(refused_config))
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "InsufficientPrivilege" in refused.stderr


def test_a_schema_dumped_with_pg_dump_and_restored_with_pg_restore_keeps_its_history(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """The guide's backup and restore: `pg_dump -Fc -n SCHEMA`, the schema lost (dropped), `pg_restore`.
    `check --state` tells the loss (no state there) and the restore (its cursors back); the next `once`
    resumes from the restored cursors: the lead added since the dump is announced, nothing already
    delivered goes again, no baseline is taken. (This is why a PostgreSQL state needs no lineage marker:
    the cursors travel with the rows they produced.)"""
    import shutil
    import subprocess

    simulator, server = sim
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url)],
        leads={"start": "2000-01-01T00:00:00Z", "lookback": "1d"},
        state=_state(postgres_db),
    )
    assert cli("once", "-c", str(config)).returncode == 0
    delivered = set(receiver.event_ids())
    assert len(delivered) == len(simulator.lead_ids())
    dump = tmp_path / "state.dump"
    pg_dump, pg_restore = shutil.which("pg_dump"), shutil.which("pg_restore")
    assert pg_dump is not None and pg_restore is not None, "pg_dump and pg_restore are needed (postgresql-client)"
    # The guide's command: the leadership tables' rows left out (a restored lease would hand out an epoch again).
    subprocess.run(
        [pg_dump, "-Fc", "-n", SCHEMA, f"--exclude-table-data={SCHEMA}.leadership*", "-f", str(dump), postgres_db.url],
        check=True,
        timeout=60,
    )
    new = simulator.add_lead(simulator.campaign_ids()[0])["id"]

    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
    lost = cli("check", "-c", str(config), "--state")
    assert "no state there yet" in lost.stdout, lost.stdout + lost.stderr
    subprocess.run([pg_restore, "-d", postgres_db.url, str(dump)], check=True, timeout=60)
    back = cli("check", "-c", str(config), "--state")
    assert back.returncode == 0 and "1 streams with a cursor" in back.stdout, back.stdout + back.stderr

    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*) FROM {SCHEMA}.leadership").fetchone() == (0,)
    assert cli("once", "-c", str(config)).returncode == 0
    after = receiver.event_ids()
    assert set(after) - delivered and len(after) == len(delivered) + 1, "only the new lead goes out"
    announced = {e["data"]["lead"]["id"] for e in receiver.verified_events(WEBHOOK_KEY) if e["type"] == "lead.created"}
    assert new in announced
