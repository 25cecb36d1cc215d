"""Personal data stays private on disk: a 0600 state file whatever the umask, a warning for a readable secret."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from tests.support.daemon import PASSWORD, Daemon, cli, wait_until, write_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_file_wal_and_shm_are_0600_under_umask_022(tmp_path: Path, sim) -> None:
    """A daemon started under umask 022 keeps the state file, its -wal and its -shm at 0600."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url)
    old = os.umask(0o022)
    try:
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            files = [tmp_path / "state.db", tmp_path / "state.db-wal", tmp_path / "state.db-shm"]
            wait_until(lambda: all(f.exists() for f in files), 10, "the -wal and -shm files")
            assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
            assert daemon.stop() == 0
    finally:
        os.umask(old)


def test_an_older_world_readable_state_file_is_tightened(tmp_path: Path, sim) -> None:
    """A state file an older release left at 0644 (with its -wal) is 0600 after the next run."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url)
    # Raw on purpose: a file an older release left, held open by a plain connection so its -wal stays on disk.
    holder = sqlite3.connect(tmp_path / "state.db")
    holder.execute("PRAGMA journal_mode = WAL")
    holder.execute("CREATE TABLE scratch (x)")
    os.chmod(tmp_path / "state.db", 0o644)
    os.chmod(tmp_path / "state.db-wal", 0o644)
    try:
        result = cli("once", "-c", str(config))
        assert result.returncode == 0, result.stderr
        assert _mode(tmp_path / "state.db") == 0o600
        assert _mode(tmp_path / "state.db-wal") == 0o600
    finally:
        holder.close()


def test_readable_config_with_a_literal_secret_draws_a_warning(tmp_path: Path, sim) -> None:
    """A 0644 config holding the password itself is named in a warning; 0600, or the secret in a file, is quiet."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url)
    os.chmod(config, 0o644)
    loud = cli("check", "-c", str(config))
    assert loud.returncode == 0, loud.stderr
    assert "readable by group or others" in loud.stderr and "convertr.password" in loud.stderr
    assert PASSWORD not in loud.stderr + loud.stdout
    os.chmod(config, 0o600)
    assert "readable by group or others" not in cli("check", "-c", str(config)).stderr
    (tmp_path / "password").write_text(PASSWORD)
    config.write_text(config.read_text().replace(f'password = "{PASSWORD}"', 'password_file = "password"'))
    os.chmod(config, 0o644)
    assert "readable by group or others" not in cli("check", "-c", str(config)).stderr
