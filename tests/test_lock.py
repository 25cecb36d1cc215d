"""One writer per state file: the real CLI in subprocesses against the simulator and a loopback receiver."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.daemon import WEBHOOK_KEY, Daemon, cli, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver
from watcher.errors import StateError, StateLocked
from watcher.exitcodes import EXIT_LOCKED
from watcher.lock import lock_path, read_holder, state_lock
from watcher.simulator import Simulator, SimulatorServer

# Far above a refused start (interpreter, imports, config): a second writer that waits for the
# lock, or runs, blows through it.
REFUSAL_WITHIN = 15.0


def _lead_ids(receiver: Receiver) -> Counter[int]:
    return Counter(
        e["data"]["lead"]["id"] for e in receiver.verified_events(WEBHOOK_KEY) if e["type"] == "lead.created"
    )


def _add_leads(simulator: Simulator, n: int) -> list[int]:
    return [simulator.add_lead(simulator.campaign_ids()[0])["id"] for _ in range(n)]


def _delivered(receiver: Receiver, ids: list[int], what: str) -> None:
    wait_until(lambda: set(_lead_ids(receiver)) >= set(ids), 30, what)


def _assert_refused(result: subprocess.CompletedProcess[str], daemon: Daemon) -> str:
    """The one stderr line of a writer refused beside `daemon`, after checking status and content."""
    assert daemon.proc is not None
    assert result.returncode == EXIT_LOCKED, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert str(daemon.state) in line
    assert f"pid {daemon.proc.pid} (convertr-watcher run -c {daemon.config})" in line
    return line


def test_second_run_refuses_at_once_and_the_first_keeps_delivering(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """A second `run` on a state file in use exits 75 at once with one line naming the file and the holder,
    while the first keeps delivering and every event arrives exactly once."""
    simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)])
    with Daemon(config) as first:
        first.wait_polls(1)
        before = _add_leads(simulator, 3)
        _delivered(receiver, before, "the first daemon's deliveries")
        started = time.monotonic()
        second = cli("run", "-c", str(config), timeout=60)
        took = time.monotonic() - started
        line = _assert_refused(second, first)
        assert took < REFUSAL_WITHIN, f"refusal took {took:.1f}s"
        assert line.startswith(f"convertr-watcher: state file {first.state} is in use by pid ")
        after = _add_leads(simulator, 4)
        _delivered(receiver, before + after, "deliveries after the refusal")
        first.wait_polls(1)
        assert first.stop() == 0
    counts = _lead_ids(receiver)
    assert set(counts) == set(before + after)
    assert all(n == 1 for n in counts.values()), counts
    assert len(set(receiver.event_ids())) == len(receiver.event_ids())


def test_once_refused_while_status_check_and_replay_work_beside_a_running_daemon(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """Beside a running daemon `once` exits 75 naming the holder, while `status`, `check` and `replay` work."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)])
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        _assert_refused(cli("once", "-c", str(config)), daemon)
        status = cli("status", "-c", str(config), "--json")
        assert status.returncode == 0, status.stderr
        assert '"leads.created"' in status.stdout
        check = cli("check", "-c", str(config))
        assert check.returncode == 0, check.stderr
        replay = cli("replay", "-c", str(config), "--all")
        assert replay.returncode == 0, replay.stderr
        assert daemon.running()
        daemon.wait_polls(1)
        assert daemon.stop() == 0


def test_sigkilled_holder_leaves_no_stale_lock(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """After the holder is SIGKILLed, a new `run` on the same state file starts, records itself and delivers."""
    simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)])
    with Daemon(config) as first:
        first.wait_polls(1)
        assert first.proc is not None
        killed = first.proc.pid
        first.kill()
    assert lock_path(first.state).exists(), "the file stays; only the lock went with the process"
    with Daemon(config) as second:
        second.wait_polls(1)
        assert second.proc is not None
        holder = read_holder(second.state)
        assert holder is not None and holder.pid == second.proc.pid != killed
        new = _add_leads(simulator, 2)
        _delivered(receiver, new, "deliveries by the restarted daemon")
        assert second.stop() == 0


def test_lock_file_is_private_and_names_its_holder(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """The lock file sits beside the state file, is mode 0600, and records the holder's pid, command, host, start."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)])
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        assert daemon.proc is not None
        path = lock_path(daemon.state)
        assert path == tmp_path / "state.db.lock"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        holder = read_holder(daemon.state)
        assert holder is not None
        assert holder.pid == daemon.proc.pid
        assert holder.command == f"convertr-watcher run -c {config}"
        assert holder.host == os.uname().nodename
        assert holder.started_at.endswith("Z")
        assert daemon.stop() == 0


def test_lock_file_made_by_root_belongs_to_the_state_folder_owner(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer]
) -> None:
    """A lock file first created by a writing command belongs to the state folder's owner, so that the service's
    own user can lock it after an operator ran `sudo convertr-watcher once`."""
    _simulator, server = sim
    folder = tmp_path / "state"
    folder.mkdir()
    if os.geteuid() == 0:
        # As root the suite plays the operator: the folder belongs to the service's user.
        os.chown(folder, 4242, 4242)
    config = write_config(tmp_path, server.url, [webhook_sink("http://127.0.0.1:9/hook")])
    config.write_text(config.read_text().replace('path = "state.db"', 'path = "state/state.db"'))
    result = cli("once", "-c", str(config))
    assert result.returncode == 0, result.stderr
    lock = (folder / "state.db.lock").stat()
    assert (lock.st_uid, lock.st_gid) == (folder.stat().st_uid, folder.stat().st_gid)


def test_lock_is_exclusive_across_open_files_and_released_on_exit(tmp_path: Path) -> None:
    """A second lock of one state file fails at once, naming the first holder, and succeeds once the first ends."""
    state = tmp_path / "state.db"
    with state_lock(state, "convertr-watcher run -c first.toml") as first:
        with pytest.raises(StateLocked) as refused, state_lock(state, "convertr-watcher once -c second.toml"):
            pass
        message = str(refused.value)
        assert f"state file {state} is in use by pid {first.pid} (convertr-watcher run -c first.toml)" in message
        assert "\n" not in message
    with state_lock(state, "convertr-watcher once -c second.toml") as second:
        assert read_holder(state) == second


def test_missing_state_folder_is_a_clear_error(tmp_path: Path) -> None:
    """Locking a state file in a folder that does not exist names the folder instead of raising OSError."""
    missing = tmp_path / "nowhere"
    with (
        pytest.raises(StateError, match=re.escape(f"state directory {missing} does not exist")),
        state_lock(missing / "state.db", "convertr-watcher run -c x.toml"),
    ):
        pass
