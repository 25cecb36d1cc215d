"""A state file that lost its history or is damaged is refused in one line, never silently re-baselined or looped on.

Everything goes through the real CLI in a subprocess; the damage is done to the real SQLite file
the way an operator's host does it: a -wal deleted after SIGKILL, a file cut short, bytes flipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, cli, events_json, healthz, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver

EXIT_CONFIG = 78


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "warning:" not in line]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _run_until_exit(config: Path, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`run` in a subprocess that must end by itself (a refusal), within `timeout`."""
    return subprocess.run(
        [sys.executable, "-m", "watcher", "run", "-c", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _root_page(path: Path, table: str) -> int:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0])
    finally:
        conn.close()


def _flip_page_header(path: Path, page: int) -> None:
    """Overwrite a b-tree page's header (its type byte and cell count) with 0xff: a used page, damaged."""
    size = 4096
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as conn:
        size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    with path.open("r+b") as fh:
        fh.seek((page - 1) * size + (100 if page == 1 else 0))
        fh.write(b"\xff" * 8)


def _checkpoint(path: Path) -> None:
    conn = sqlite3.connect(path, timeout=10)
    try:
        busy, _frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "the daemon held a read transaction through the checkpoint"
    finally:
        conn.close()


def _metrics_port(daemon: Daemon) -> int | None:
    for line in daemon.log().splitlines():
        if "metrics endpoint listening" in line:
            return int(json.loads(line)["port"])
    return None


def test_a_state_whose_wal_was_deleted_after_sigkill_is_refused(tmp_path: Path, sim, receiver: Receiver) -> None:
    """30 pending events, SIGKILL, state.db-wal deleted: status, check --state and run refuse; --start-over runs."""
    simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url, retry_schedule=["1h"])])
    receiver.respond(500)
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        simulator.add_leads(30, simulator.campaign_ids()[0])
        wait_until(lambda: len(events_json(config, "--status", "pending")) == 30, 20, "30 pending events")
        daemon.kill()
    wal = daemon.state.with_name("state.db-wal")
    assert wal.exists() and wal.stat().st_size > 0, "the history lived in the WAL"
    wal.unlink()
    daemon.state.with_name("state.db-shm").unlink(missing_ok=True)

    status = cli("status", "-c", str(config))
    assert status.returncode == EXIT_CONFIG, status
    assert "lost its history" in _one_line(status.stderr)
    check = cli("check", "-c", str(config), "--state")
    assert check.returncode == EXIT_CONFIG, check
    run = _run_until_exit(config)
    assert run.returncode == EXIT_CONFIG, run
    line = _one_line(run.stderr)
    assert "lost its history" in line and "--start-over" in line and "Restore a backup" in line

    with Daemon(config, args=["--start-over"]) as fresh:
        fresh.wait_polls(1)
        assert fresh.stop() == 0
    assert "--start-over: the state file has no history" in fresh.log()
    assert cli("status", "-c", str(config)).returncode == 0


@pytest.fixture
def state_with_history(tmp_path: Path, sim, receiver: Receiver) -> Path:
    """A config whose state file has a cursor and 40 tracked leads, checkpointed by a clean `once`."""
    simulator, server = sim
    sink = webhook_sink(receiver.url, retry_schedule=["1s"] * 30)
    config = write_config(tmp_path, server.url, [sink], extra='\n[metrics]\nlisten = "127.0.0.1:0"\n')
    simulator.add_leads(40, simulator.campaign_ids()[0])
    first = cli("once", "-c", str(config))
    assert first.returncode == 0, first.stderr
    return config


def test_a_truncated_state_file_is_refused_at_start(state_with_history: Path) -> None:
    """Cut to half its size: `run` exits 78 at once with one line (not "waiting for space"); check --state agrees."""
    state = state_with_history.parent / "state.db"
    os.truncate(state, state.stat().st_size // 2)
    run = _run_until_exit(state_with_history)
    assert run.returncode == EXIT_CONFIG, run
    assert "damaged" in _one_line(run.stderr)
    assert "waiting for space" not in run.stdout
    check = cli("check", "-c", str(state_with_history), "--state")
    assert check.returncode == EXIT_CONFIG and "damaged" in _one_line(check.stderr), check


def test_flipped_bytes_in_a_used_page_are_found_and_refused(state_with_history: Path) -> None:
    """A damaged b-tree page of the leads table: check --state names it, run refuses it in one line."""
    state = state_with_history.parent / "state.db"
    assert cli("check", "-c", str(state_with_history), "--state").returncode == 0
    _flip_page_header(state, _root_page(state, "leads"))
    check = cli("check", "-c", str(state_with_history), "--state")
    assert check.returncode == EXIT_CONFIG, check
    assert "damaged" in _one_line(check.stderr)
    run = _run_until_exit(state_with_history)
    assert run.returncode == EXIT_CONFIG, run
    assert "damaged" in _one_line(run.stderr)


def test_a_state_file_damaged_while_running_stops_polls_once_and_turns_health_red(
    state_with_history: Path, sim, receiver: Receiver
) -> None:
    """Damage under a running daemon: one error line, health red, no poll loop, pending deliveries still go out."""
    simulator, _server = sim
    state = state_with_history.parent / "state.db"
    campaign = simulator.campaign_ids()[0]
    with Daemon(state_with_history) as daemon:
        port = wait_until(lambda: _metrics_port(daemon), 20, "the metrics endpoint")
        daemon.wait_polls(1)
        receiver.respond(500)
        pending = set(simulator.add_leads(3, campaign))
        wait_until(lambda: len(events_json(state_with_history, "--status", "pending")) == 3, 20, "3 pending events")
        _checkpoint(state)  # the leads table's pages now live in the main file only
        _flip_page_header(state, _root_page(state, "leads"))
        receiver.respond(200)
        # Another process's write makes the daemon drop its page cache and read the page from disk.
        assert cli("replay", "-c", str(state_with_history), "--pending").returncode == 0
        simulator.add_leads(2, campaign)
        wait_until(lambda: healthz(port)[0] == 503, 20, "health to go red")
        assert "damaged" in healthz(port)[1]
        wait_until(lambda: pending <= _accepted_leads(receiver), 20, "the pending deliveries")
        # Three poll intervals: health stays red, the daemon stays up, nothing more is said.
        said = daemon.log().count("state file is damaged")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert healthz(port)[0] == 503
            assert daemon.running()
        assert daemon.stop() == 0
    log = daemon.log()
    assert log.count("state file is damaged: polling stops") == 1, log[-3000:]
    assert log.count("state file is damaged") == said
    assert "Traceback" not in log


def _accepted_leads(receiver: Receiver) -> set[int]:
    return {r.json()["data"]["lead"]["id"] for r in receiver.requests if r.status == 200 and r.method == "POST"}


def test_status_reads_a_state_file_on_a_read_only_mount(state_with_history: Path) -> None:
    """A read-only state folder: status still reads a cleanly stopped state and says the folder is read-only."""
    assert shutil.which("unshare"), "util-linux is needed for a private read-only mount"
    folder = state_with_history.parent
    assert not (folder / "state.db-wal").exists(), "a clean `once` leaves no -wal"
    status = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-euc",
         f'mount --bind "{folder}" "{folder}"; mount -o remount,ro,bind "{folder}"; '
         f'exec "{sys.executable}" -m watcher status -c "{state_with_history}"'],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert re.search(r"^[1-9][0-9]* leads tracked$", status.stdout, re.M), status.stdout
    assert f"STATE FILE: {folder} is read-only" in status.stdout


def test_a_state_file_replaced_under_the_running_daemon_stops_it_cleanly(
    tmp_path: Path, sim, receiver: Receiver
) -> None:
    """An older copy moved over the live file: the daemon stops (exit 1) instead of writing into the file that
    was there, and the next start re-reads from the copy's cursor: the leads since go again under the same ids."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)])
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        first = set(simulator.add_leads(2, campaign))
        wait_until(lambda: first <= _accepted_leads(receiver), 20, "the first leads")
        older = tmp_path / "older.db"
        with closing(sqlite3.connect(daemon.state)) as live, closing(sqlite3.connect(older)) as copy:
            live.backup(copy)  # as `sqlite3 .backup` does; closed, so the daemon's stop can fold its -wal in
        later = set(simulator.add_leads(2, campaign))
        wait_until(lambda: later <= _accepted_leads(receiver), 20, "the leads after the copy")
        os.replace(older, daemon.state)
        assert daemon.proc is not None
        assert daemon.proc.wait(20) == 1
    assert daemon.log().count("the state file was replaced or removed") == 1
    wal = daemon.state.with_name("state.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "the old file's WAL would meet the new file"
    ids = {r.headers["webhook-id"] for r in receiver.requests if r.status == 200}
    sent = len(receiver.requests)
    with Daemon(config) as again:
        wait_until(lambda: len(receiver.requests) >= sent + 2, 20, "the leads after the copy, again")
        newest = set(simulator.add_leads(2, campaign))
        wait_until(lambda: newest <= _accepted_leads(receiver), 20, "new leads")
        assert again.stop() == 0
    resent = [r for r in receiver.requests[sent:] if r.json()["data"]["lead"]["id"] in later]
    assert resent and {r.headers["webhook-id"] for r in resent} <= ids
    assert "damaged" not in again.log()


def test_outbox_pages_damaged_under_a_running_daemon_are_said_once(
    state_with_history: Path, sim, receiver: Receiver
) -> None:
    """The events table damaged while deliveries wait: one line, health red, polls stop; no error line a turn."""
    simulator, _server = sim
    state = state_with_history.parent / "state.db"
    with Daemon(state_with_history) as daemon:
        port = wait_until(lambda: _metrics_port(daemon), 20, "the metrics endpoint")
        daemon.wait_polls(1)
        receiver.respond(500)
        simulator.add_leads(3, simulator.campaign_ids()[0])
        wait_until(lambda: len(events_json(state_with_history, "--status", "pending")) == 3, 20, "3 pending events")
        _checkpoint(state)
        _flip_page_header(state, _root_page(state, "events"))
        receiver.respond(200)
        # Makes the retries due now (and meets the damage itself when one is waiting, exit 78).
        assert cli("replay", "-c", str(state_with_history), "--pending").returncode in (0, EXIT_CONFIG)
        wait_until(lambda: healthz(port)[0] == 503, 20, "health to go red")
        polls = daemon.polls()
        deadline = time.monotonic() + 3.0  # three poll intervals and more than one worker backoff
        while time.monotonic() < deadline:
            assert healthz(port)[0] == 503
        assert daemon.polls() == polls, "a walk went on writing into the damaged file"
        assert daemon.stop() == 0
    log = daemon.log()
    assert log.count('"event": "state file is damaged') == 1, log[-3000:]
    assert "delivery worker error" not in log
