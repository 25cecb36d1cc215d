"""`copy-state`: the whole state from SQLite to PostgreSQL and back, through the real CLI in a
subprocess, the simulator and a receiver over loopback, and a real PostgreSQL database of the test's own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import serving
from tests.support.backends import Backend
from tests.support.daemon import WEBHOOK_KEY, Daemon, cli, events_json, wait_until, webhook_sink, write_config
from tests.support.leaders import another_hosts_lease
from tests.support.postgres import PG_PASSWORD, Database
from tests.support.receiver import Receiver
from watcher.config import PostgresState, StateConfig
from watcher.exitcodes import EXIT_CONFIG, EXIT_LOCKED
from watcher.simulator import Simulator, SimulatorServer
from watcher.state.copy import IDENTITIES, TABLES, copy_state, schema_tables
from watcher.state.store import Store, open_store, open_store_readonly

SCHEMA = "convertr_copied"
# A sink nobody answers: its deliveries stay pending with attempts, an error and a next attempt time.
DOWN = webhook_sink("http://127.0.0.1:9/hook", name="down")


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=7, campaigns=2, leads=10) as pair:
        yield pair


def _url(db: Database) -> str:
    # A password in the URL (trust authentication ignores it): it must reach no output.
    return f"postgresql://{db.server.user}:{PG_PASSWORD}@{db.server.host}:{db.server.port}/{db.name}"


def _config(folder: Path, server: SimulatorServer, receiver: Receiver, state: dict[str, str]) -> Path:
    folder.mkdir(exist_ok=True)
    return write_config(
        folder,
        server.url,
        [webhook_sink(receiver.url), DOWN],
        leads={"start": "2000-01-01T00:00:00Z", "lookback": "1d"},
        state=state,
    )


def _pg_state(db: Database, schema: str = SCHEMA) -> StateConfig:
    pg = PostgresState(url=db.url, host=db.server.host, port=db.server.port, dbname=db.name, schema=schema)
    return StateConfig(path=Path(), postgres=pg)


def _tables(state: StateConfig) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, in key order (floats as stored: both backends keep doubles exactly)."""
    order = {"deliveries": "event_seq, sink", "unreadable": "stream, lead_id", "cursors": "stream"}
    order |= {"sinks": "name", "tracks": "signature", "events": "seq"}
    with open_store_readonly(state) as store:
        return {t: [dict(r) for r in store._rows(f"SELECT * FROM {t} ORDER BY {order.get(t, 'id')}")] for t in TABLES}


def _leads_sent(receiver: Receiver, before: set[str]) -> list[int]:
    """The lead ids of the verified webhooks whose webhook-id is not in `before`."""
    pairs = zip(receiver.event_ids(), receiver.verified_events(WEBHOOK_KEY), strict=True)
    return sorted(body["data"]["lead"]["id"] for msg_id, body in pairs if msg_id not in before)


def _copy(config: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    result = cli("copy-state", "-c", str(config), *args, env=env)
    assert PG_PASSWORD not in result.stdout + result.stderr
    return result


def test_copy_to_postgresql_and_back_carries_on_without_sending_anything_again(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """A state `once` made on SQLite is copied to PostgreSQL (URL from --to-env) row for row: `events` lists the
    same deliveries with the same seqs, statuses and attempts; `once` on the copy delivers only the leads that
    arrived since (the cursor carried over); copied back to a new SQLite file, the same again."""
    simulator, server = sim
    sqlite_config = _config(tmp_path / "a", server, receiver, {"path": "state.db"})
    cli("once", "-c", str(sqlite_config))  # exit 1: the down sink failed (what puts pending rows in the copy)
    first = set(receiver.event_ids())
    assert len(first) == len(simulator.lead_ids()) == len(receiver.event_ids())
    with Store.open(tmp_path / "a" / "state.db") as store:  # a forgotten lead: its tombstone goes across too
        store.forget(simulator.lead_ids()[0], 1_700_000_000.0)
    source_rows = _tables(StateConfig(path=tmp_path / "a" / "state.db"))
    down = [d for d in events_json(sqlite_config) if d["sink"] == "down"]
    assert down and all(d["status"] == "pending" and d["attempts"] == 1 for d in down)

    copied = _copy(sqlite_config, "--to-env", "COPY_TARGET", "--schema", SCHEMA, env={"COPY_TARGET": _url(postgres_db)})
    assert copied.returncode == 0, copied.stderr
    assert f"copied the state to postgresql://{postgres_db.server.host}" in copied.stdout
    assert _tables(_pg_state(postgres_db)) == source_rows
    pg_config = _config(tmp_path / "b", server, receiver, {"url": _url(postgres_db), "schema": SCHEMA})
    assert events_json(pg_config) == events_json(sqlite_config)
    status = json.loads(cli("status", "-c", str(pg_config), "--json").stdout)
    assert [t["lead_id"] for t in status["forgotten_leads"]] == [simulator.lead_ids()[0]]

    new = simulator.add_leads(3, simulator.campaign_ids()[0])
    cli("once", "-c", str(pg_config))
    sent = receiver.event_ids()
    assert len(sent) == len(set(sent)) == len(first) + 3, "an event went again, or a new one was missed"
    assert _leads_sent(receiver, first) == sorted(new)
    pg_rows = _tables(_pg_state(postgres_db))
    assert [e["seq"] for e in pg_rows["events"]] == sorted(e["seq"] for e in pg_rows["events"])
    assert pg_rows["events"][: len(source_rows["events"])] == source_rows["events"]  # new seqs come after

    back = tmp_path / "c" / "state.db"
    back.parent.mkdir()
    copied = _copy(pg_config, "--to", str(back))
    assert copied.returncode == 0, copied.stderr
    assert _tables(StateConfig(path=back)) == pg_rows
    back_config = _config(tmp_path / "c", server, receiver, {"path": "state.db"})
    assert events_json(back_config) == events_json(pg_config)
    newer = simulator.add_leads(2, simulator.campaign_ids()[0])
    cli("once", "-c", str(back_config))
    again = receiver.event_ids()
    assert len(again) == len(set(again)) == len(sent) + 2
    assert _leads_sent(receiver, set(sent)) == sorted(newer)


def test_generated_keys_go_on_from_the_source_high_water_mark(tmp_path: Path, postgres_db: Database) -> None:
    """Seqs handed out to events since pruned are not handed out again on the copy, either way."""
    from tests.test_outbox import _event as event_for  # the outbox tests' event maker

    with Store.open(tmp_path / "s.db") as source:
        from watcher.state.outbox import enqueue

        with source.transaction() as c:
            enqueue(c, [(event_for(i), ["crm"]) for i in range(5)], 1.0)
        with source.transaction() as c:
            c.execute("DELETE FROM events WHERE seq > 2")
        with open_store(_pg_state(postgres_db)) as target:
            copy_state(source, target)
            with target.transaction() as c:
                enqueue(c, [(event_for(9), ["crm"])], 2.0, target.dialect)
            assert [e["seq"] for e in _tables(_pg_state(postgres_db))["events"]] == [1, 2, 6]
            with Store.open(tmp_path / "back.db") as back:
                copy_state(target, back)
                with back.transaction() as c:
                    enqueue(c, [(event_for(10), ["crm"])], 3.0)
                assert [e["seq"] for e in _tables(StateConfig(path=tmp_path / "back.db"))["events"]] == [1, 2, 6, 7]
    assert ("events", "seq") in IDENTITIES


def test_the_copy_knows_every_table_of_the_schema(backend: Backend) -> None:
    """A table added by a migration and not copied would be lost in a copy: the list covers the schema."""
    with backend.open() as store:
        assert schema_tables(store) == set(TABLES)


def test_refused_while_a_daemon_holds_the_sqlite_source(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """While `run` holds the SQLite file's lock, copy-state exits 75 in one line and writes nothing."""
    _, server = sim
    config = _config(tmp_path / "a", server, receiver, {"path": "state.db"})
    with Daemon(config) as daemon:
        wait_until(lambda: receiver.event_ids(), 30, "the daemon delivering")
        result = _copy(config, "--to", _url(postgres_db), "--schema", SCHEMA)
        assert daemon.running()
    assert result.returncode == EXIT_LOCKED, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "is in use by" in result.stderr
    with psycopg.connect(postgres_db.url) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (SCHEMA,)).fetchone()
    assert found is None, "the refused copy made the target schema"


def test_refused_while_a_daemon_leads_the_postgresql_source(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """With a live lease on the PostgreSQL source, copy-state exits 75 naming the leader; no file is made."""
    _, server = sim
    config = _config(tmp_path / "b", server, receiver, {"url": _url(postgres_db), "schema": SCHEMA})
    assert cli("once", "-c", str(config)).returncode in (0, 1)  # 1: the down sink
    another_hosts_lease(postgres_db.url, SCHEMA)
    target = tmp_path / "copy.db"
    result = _copy(config, "--to", str(target))
    assert result.returncode == EXIT_LOCKED, result.stderr
    assert "led by a running daemon (pid 4242 on host-b" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not target.exists()


def test_refuses_a_target_that_holds_a_state(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver, postgres_db: Database
) -> None:
    """A second copy into the same schema (or a used SQLite file) exits 78 in one line and changes nothing."""
    _, server = sim
    config = _config(tmp_path / "a", server, receiver, {"path": "state.db"})
    cli("once", "-c", str(config))
    assert _copy(config, "--to", _url(postgres_db), "--schema", SCHEMA).returncode == 0
    before = _tables(_pg_state(postgres_db))
    again = _copy(config, "--to", _url(postgres_db), "--schema", SCHEMA)
    assert again.returncode == EXIT_CONFIG, again.stderr
    assert "already holds a state" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert _tables(_pg_state(postgres_db)) == before

    other = _config(tmp_path / "b", server, receiver, {"path": "state.db"})
    cli("once", "-c", str(other))
    into_used = _copy(config, "--to", str(tmp_path / "b" / "state.db"))
    assert into_used.returncode == EXIT_CONFIG and "already holds a state" in into_used.stderr
