"""`convertr-watcher events`: the outbox listed for operators, over the real CLI beside a real daemon."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import serving
from tests.support.daemon import WEBHOOK_KEY, Daemon, cli, wait_until, webhook_sink, write_config
from tests.support.daemon import events_json as events
from tests.support.receiver import Receiver
from watcher.simulator import Simulator, SimulatorServer

# What the refusing receiver answers: an e-mail address and the sink's own secret, both of which
# must come out of the attempt log masked.
REFUSAL = json.dumps({"error": "lead rejected for ava.patel@blueharbour.example", "echo": WEBHOOK_KEY}).encode()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Receiver, list[int], Daemon]]:
    """A running daemon that delivered 3 new leads to `crm` and saw `broken` refuse them until dead.

    One for the module: the tests below only read it, and a daemon's start is most of their time.
    """
    tmp_path = tmp_path_factory.mktemp("events")
    with serving() as (simulator, server), Receiver() as good, Receiver() as bad:
        bad.respond(400, REFUSAL, {"content-type": "application/json"})
        config = write_config(tmp_path, server.url, [webhook_sink(good.url, "crm"), webhook_sink(bad.url, "broken")])
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            leads = [int(simulator.add_lead(simulator.campaign_ids()[0])["id"]) for _ in range(3)]
            good.wait_for_count(3, timeout=30)
            # Listed by `events` itself while the daemon runs: every delivery settled.
            wait_until(
                lambda: (
                    [r["status"] for r in events(config, "--sink", "crm")] == ["delivered"] * 3
                    and [r["status"] for r in events(config, "--sink", "broken")] == ["dead"] * 3
                ),
                30,
                "crm delivered and broken dead, as `events` lists them",
            )
            yield config, good, leads, daemon


def test_json_lists_exactly_the_ids_the_receiver_got(history: tuple[Path, Receiver, list[int], Daemon]) -> None:
    """Each `crm` row's id is a webhook-id the receiver got, one row per id, with the operator's fields filled."""
    config, good, leads, daemon = history
    rows = events(config, "--sink", "crm")
    assert daemon.running()
    assert sorted(r["id"] for r in rows) == sorted(good.event_ids())
    assert len(good.event_ids()) == len(set(good.event_ids())) == 3
    for row in rows:
        assert set(row) >= {"id", "type", "resource", "sink", "status", "attempts", "detected_at", "delivered_at"}
        assert row["type"] == "lead.created" and row["sink"] == "crm" and row["attempts"] == 1
        assert row["last_error"] is None and row["detected_at"] <= row["delivered_at"]
        assert row["detected_at"].endswith("Z") and row["resource"] in {f"lead:{i}" for i in leads}


def test_filters_narrow_the_listing(history: tuple[Path, Receiver, list[int], Daemon]) -> None:
    """--status, --sink, --type, --lead, --since and --limit each keep only the rows they name."""
    config, _, leads, _ = history
    everything = events(config)
    assert len(everything) == 6
    dead = events(config, "--status", "dead")
    assert {(r["sink"], r["status"]) for r in dead} == {("broken", "dead")} and len(dead) == 3
    assert all(r["last_error"].startswith("HTTP 400") and r["attempts"] == 2 for r in dead)
    assert events(config, "--status", "pending") == []
    one = events(config, "--lead", str(leads[1]))
    assert {r["sink"] for r in one} == {"crm", "broken"} and {r["resource"] for r in one} == {f"lead:{leads[1]}"}
    assert len(events(config, "--type", "lead.created")) == 6
    assert events(config, "--type", "campaign.status_changed") == []
    latest = events(config, "--limit", "2")
    assert latest == everything[:2]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert events(config, "--since", later) == []
    assert len(events(config, "--since", "2000-01-01T00:00:00Z", "--sink", "crm", "--sink", "broken")) == 6


def test_attempts_show_a_scrubbed_excerpt_of_each_answer(history: tuple[Path, Receiver, list[int], Daemon]) -> None:
    """--attempts adds the attempt log: status and the start of the answer, with the e-mail and secret masked."""
    config, *_ = history
    refused = events(config, "--sink", "broken", "--attempts")
    for row in refused:
        log = row["attempt_log"]
        assert [a["attempt"] for a in log] == [1, 2] and {a["status_code"] for a in log} == {400}
        for a in log:
            assert "lead rejected for [REDACTED]" in a["excerpt"]
            assert "blueharbour" not in a["excerpt"] and WEBHOOK_KEY not in a["excerpt"]
            assert a["error"].startswith("HTTP 400")
    taken = events(config, "--sink", "crm", "--attempts")
    assert all([a["status_code"] for a in r["attempt_log"]] == [200] for r in taken)


def test_table_and_csv_carry_the_same_rows(history: tuple[Path, Receiver, list[int], Daemon]) -> None:
    """The CSV has the JSON's rows and columns; the table has a header and one line per delivery."""
    config, *_ = history
    as_json = events(config)
    result = cli("events", "-c", str(config), "--format", "csv")
    assert result.returncode == 0, result.stderr
    as_csv = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["id"] for r in as_csv] == [r["id"] for r in as_json]
    assert list(as_csv[0]) == list(as_json[0])
    table = cli("events", "-c", str(config), "--attempts")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "TYPE", "RESOURCE", "SINK", "STATUS"]
    assert sum(1 for line in lines if line.startswith("evt_")) == 6
    assert sum(1 for line in lines if line.startswith("    #")) == 3 * 2 + 3


def test_events_never_writes_and_needs_a_state_file(tmp_path: Path, sim: tuple[Simulator, SimulatorServer]) -> None:
    """Without a state file `events` exits 1 and creates none; with one it leaves the database unchanged."""
    _, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink("http://127.0.0.1:9/hook")])
    missing = cli("events", "-c", str(config))
    assert missing.returncode == 1 and "no state file" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "state.db").exists()
    once = cli("once", "-c", str(config))
    assert (tmp_path / "state.db").exists(), once.stderr

    state = tmp_path / "state.db"
    before = hashlib.sha256(state.read_bytes()).hexdigest()
    for fmt in ("table", "json", "csv"):
        assert cli("events", "-c", str(config), "--format", fmt, "--attempts").returncode == 0
    # A WAL reader may add the shared-memory index and an empty -wal (SQLite's, for any reader);
    # the database itself keeps every byte, and the log holds no write.
    assert hashlib.sha256(state.read_bytes()).hexdigest() == before
    wal = tmp_path / "state.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
