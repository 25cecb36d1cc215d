"""Maintenance on a stopped service: no secrets needed, a broken file still shows the state, status
knows whether a daemon runs, and `forget` refuses an id the state never saw."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.daemon import WEBHOOK_KEY, Daemon, cli, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver
from watcher.simulator import Simulator, SimulatorServer


def _status(config: Path) -> dict[str, Any]:
    result = cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def _credentialed(folder: Path, api_url: str, receiver_url: str) -> tuple[Path, Path]:
    """A config whose password, sink URL and webhook secret all come from files in `credentials/`,
    as under systemd's LoadCredential=; returns (config, credentials folder)."""
    creds = folder / "credentials"
    creds.mkdir()
    (creds / "convertr-password").write_text("pw-Zq8-never-logged\n")
    (creds / "crm-url").write_text(receiver_url + "\n")
    (creds / "crm-secret").write_text(WEBHOOK_KEY + "\n")
    sink = {
        "name": "crm",
        "type": "webhook",
        "url_file": str(creds / "crm-url"),
        "secret_file": str(creds / "crm-secret"),
        "retry_schedule": ["1s"],
    }
    config = write_config(
        folder,
        api_url,
        [sink],
        convertr={"password_file": str(creds / "convertr-password")},
        leads={"start": "2000-01-01T00:00:00Z", "lookback": "1d"},
    )
    # write_config puts a literal password in; the file form replaces it.
    config.write_text(config.read_text().replace('password = "pw-Zq8-never-logged"\n', ""))
    return config, creds


def test_maintenance_commands_work_without_the_services_secrets(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """With every credential file gone (the unit stopped), status, events, replay and forget still
    work on the state; run and check still refuse with exit 78 naming the missing secret."""
    _simulator, server = sim
    config, creds = _credentialed(tmp_path, server.url, receiver.url)
    assert cli("once", "-c", str(config)).returncode == 0
    lead = receiver.requests[0].json()["data"]["lead"]["id"]
    for file in creds.iterdir():
        file.unlink()
    creds.rmdir()

    status = cli("status", "-c", str(config), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["tracked_leads"] >= 1
    events = cli("events", "-c", str(config), "--format", "json")
    assert events.returncode == 0, events.stderr
    assert len(events.stdout.splitlines()) == len(receiver.requests)
    replay = cli("replay", "-c", str(config), "--sink", "crm")
    assert replay.returncode == 0, replay.stderr
    assert "re-queued 0 deliveries" in replay.stdout
    forget = cli("forget", "-c", str(config), "--lead", str(lead))
    assert forget.returncode == 0, forget.stderr
    assert f"lead {lead} forgotten" in forget.stdout

    for command in ("check", "once"):
        refused = cli(command, "-c", str(config))
        assert refused.returncode == 78, (command, refused.stderr)
        assert "convertr.password_file: cannot read the file" in refused.stderr

    # A credential file that is there but broken locks them out no more than a missing one.
    creds.mkdir()
    (creds / "convertr-password").write_text("pw-Zq8-never-logged\n")
    (creds / "crm-url").write_text(receiver.url + "\n")
    (creds / "crm-secret").write_text("not-a-webhook-key\n")
    assert cli("events", "-c", str(config)).returncode == 0
    assert "sinks[0].secret_file" in cli("check", "-c", str(config)).stderr


def test_status_shows_the_state_when_the_config_no_longer_parses(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """A file with a TOML syntax error: status says the file does not load, then shows the state, exit 0."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], leads={"start": "2000-01-01T00:00:00Z"})
    assert cli("once", "-c", str(config)).returncode == 0
    config.write_text(config.read_text() + "\n[nonsense\n")

    table = cli("status", "-c", str(config))
    assert table.returncode == 0, table.stderr
    assert "does not load" in table.stderr and "Traceback" not in table.stderr
    assert "CONFIG: does not load" in table.stdout
    assert "crm" in table.stdout and "leads tracked" in table.stdout
    report = _status(config)
    assert report["config_error"] and "invalid TOML" in report["config_error"]
    assert report["tracked_leads"] >= 1
    [crm] = report["sinks"]
    assert crm["sink"] == "crm" and crm["configured"] is None and crm["stranded"] is False


def test_forget_refuses_an_id_the_state_never_saw_unless_unseen(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """A mistyped id is refused with exit 1 and leaves no tombstone; --unseen records one, and status lists it."""
    simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], leads={"start": "2000-01-01T00:00:00Z"})
    assert cli("once", "-c", str(config)).returncode == 0
    unseen = max(simulator.lead_ids()) + 1000

    refused = cli("forget", "-c", str(config), "--lead", str(unseen))
    assert refused.returncode == 1
    assert len(refused.stderr.splitlines()) == 1 and "--unseen" in refused.stderr
    assert _status(config)["forgotten_leads"] == []

    meant = cli("forget", "-c", str(config), "--lead", str(unseen), "--unseen")
    assert meant.returncode == 0, meant.stderr
    seen = simulator.lead_ids()[0]
    assert cli("forget", "-c", str(config), "--lead", str(seen)).returncode == 0
    assert sorted(f["lead_id"] for f in _status(config)["forgotten_leads"]) == sorted([seen, unseen])
    assert f"lead {unseen} forgotten at" in cli("status", "-c", str(config)).stdout


def test_status_tells_whether_a_daemon_runs(tmp_path: Path, sim: tuple[Simulator, SimulatorServer]) -> None:
    """running is true while `run` holds the state, false after SIGTERM, and a stopped daemon's record
    is not shown as live; a refused reload then the original file restored is no change."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url)
    original = config.read_text()
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        live = _status(config)
        assert live["running"] is True and live["role"] == "leader"
        assert live["holder"]["pid"] == daemon.proc.pid  # type: ignore[union-attr]
        assert live["daemon"]["config_changed"] is False

        config.write_text(original + "\n[nonsense\n")
        daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: "reload REFUSED" in daemon.log(), 15, "the refusal")
        assert _status(config)["daemon"]["config_changed"] is True
        config.write_text(original)
        restored = _status(config)["daemon"]
        assert restored["config_changed"] is False, "the restored file is the one the daemon runs"
        assert "send SIGHUP" not in cli("status", "-c", str(config)).stdout

        assert daemon.stop() == 0
    stopped = _status(config)
    assert stopped["running"] is False and stopped["role"] is None
    assert stopped["holder"] is None and stopped["daemon"] is None
    table = cli("status", "-c", str(config)).stdout
    assert "daemon: not running" in table and "config loaded" not in table


def test_the_secret_warning_says_what_the_systemd_unit_needs(tmp_path: Path) -> None:
    """A literal secret in a file others can read draws a warning that names the unit's needs (0644, root,
    secrets in X_file), not a bare chmod 600 that the DynamicUser= service could not read."""
    config = write_config(tmp_path, "http://127.0.0.1:9", [webhook_sink("http://127.0.0.1:9/hook")])
    config.chmod(0o644)
    result = cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert "DynamicUser=" in warning and "0644" in warning and "X_file" in warning and "LoadCredential=" in warning


def test_an_unreadable_config_says_what_the_systemd_unit_needs(tmp_path: Path) -> None:
    """`permission denied` on the config names this process's uid, the file's owner and mode, and what the
    units' DynamicUser= needs; one line, exit 78."""
    config = write_config(tmp_path, "http://127.0.0.1:9")
    config.chmod(0)
    # Root reads any file; without the capabilities that let it, it meets the file's mode like anyone.
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    result = subprocess.run(
        [*drop, sys.executable, "-m", "watcher", "check", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78
    [line] = result.stderr.splitlines()
    assert "permission denied" in line and f"uid {os.geteuid()}" in line and "mode 0000" in line
    assert "DynamicUser=" in line and "0644" in line
    assert line.count(str(config)) == 1
