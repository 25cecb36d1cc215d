"""A full state disk is ridden out: the daemon pauses, says why, sends nothing twice, and resumes when space returns."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.support.daemon import healthz, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver

pytestmark = pytest.mark.faults


def _fill(folder: Path) -> Path:
    """Write a file into `folder` until the file system refuses more (ENOSPC)."""
    filler = folder / "filler"
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def _delivered(receiver: Receiver) -> Counter[str]:
    return Counter(r.headers["webhook-id"] for r in receiver.requests if r.method == "POST" and r.status == 200)


def _created_leads(receiver: Receiver) -> set[int]:
    return {
        r.json()["data"]["lead"]["id"]
        for r in receiver.requests
        if r.method == "POST" and r.status == 200 and r.json()["type"] == "lead.created"
    }


def test_full_state_disk_pauses_and_recovers_without_resending(tmp_path: Path, sim, receiver: Receiver) -> None:
    """Disk full under a running daemon: health red, status says full, nothing resent, all caught up after."""
    assert shutil.which("unshare") and shutil.which("nsenter"), "util-linux is needed to mount a private tmpfs"
    simulator, server = sim
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url, retry_schedule=["300ms"] * 50)])
    text = config.read_text().replace('path = "state.db"', f'path = "{state_dir}/state.db"')
    config.write_text(text + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    log_path = tmp_path / "daemon.log"
    with log_path.open("ab") as log:
        # A private mount namespace with a 2 MiB tmpfs over the state folder; `unshare` execs the
        # shell, which execs the daemon, so the pid is the daemon's and /proc/PID/root sees the tmpfs.
        proc = subprocess.Popen(
            ["unshare", "--map-root-user", "--mount", "sh", "-euc",
             f'mount -t tmpfs -o size=2m tmpfs "{state_dir}"; exec "{sys.executable}" -m watcher run -c "{config}"'],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    inside = Path(f"/proc/{proc.pid}/root") / state_dir.relative_to("/")
    try:

        def port() -> int | None:
            for line in log_path.read_text().splitlines():
                if "metrics endpoint listening" in line:
                    return int(json.loads(line)["port"])
            return None

        metrics = wait_until(port, 20, "the metrics endpoint")
        # Leads created before the first walk ends are its baseline, never announced.
        wait_until(lambda: '"event": "poll"' in log_path.read_text(), 20, "a first poll")
        campaign = simulator.campaign_ids()[0]
        before = simulator.add_leads(3, campaign)
        receiver.respond(500)  # these stay pending, so their outcomes come due while the disk is full
        wait_until(lambda: len([r for r in receiver.requests if r.status == 500]) >= 3, 20, "failing attempts")
        # Recorded, not only answered: an outcome waits a moment for its group commit, and one the
        # full disk refused would hold the sink (by design) before anything could be delivered.
        wait_until(lambda: log_path.read_text().count('"event": "delivery failed"') >= 3, 20, "failures recorded")

        filler = _fill(inside)
        receiver.respond(200)
        during = simulator.add_leads(3, campaign)
        wait_until(lambda: healthz(metrics)[0] == 503, 30, "health to go red")
        assert "state file cannot be written" in healthz(metrics)[1]
        # One goes out; its outcome cannot be written, so the lane sends nothing new until it can.
        wait_until(lambda: set(before) & _created_leads(receiver), 20, "a pending event delivered")
        status = subprocess.run(
            ["nsenter", "-t", str(proc.pid), "-m", sys.executable, "-m", "watcher", "status", "-c", str(config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "STATE FILE:" in status.stdout and "full" in status.stdout, status.stdout + status.stderr
        # Its outcome cannot be written: over several retry periods and backoffs, nothing goes twice.
        wait_until(lambda: "cannot record a delivery outcome" in log_path.read_text(), 20, "a refused outcome")
        wait_until(lambda: log_path.read_text().count("polls pause and retry") >= 2, 40, "two refused polls")
        assert max(_delivered(receiver).values()) == 1
        assert proc.poll() is None, log_path.read_text()[-3000:]

        filler.unlink()  # space returns
        wait_until(lambda: set(before + during) <= _created_leads(receiver), 60, "every lead after space returned")
        wait_until(lambda: healthz(metrics)[0] == 200, 30, "health green again")
        after = simulator.add_leads(2, campaign)
        wait_until(lambda: set(after) <= _created_leads(receiver), 30, "new leads as usual")
        assert max(_delivered(receiver).values()) == 1, "an event was sent again after it was delivered"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        output = log_path.read_text()
        assert '"fatal"' not in output and "Traceback" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_daemon_started_on_a_full_disk_waits_for_space(tmp_path: Path, sim, receiver: Receiver) -> None:
    """Started on a full state disk (as systemd restarts it): it waits alive and starts once space returns."""
    simulator, server = sim
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)])
    config.write_text(config.read_text().replace('path = "state.db"', f'path = "{state_dir}/state.db"'))
    log_path = tmp_path / "daemon.log"
    python = sys.executable
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            ["unshare", "--map-root-user", "--mount", "sh", "-euc",
             f'mount -t tmpfs -o size=1m tmpfs "{state_dir}"\n'
             f'"{python}" -m watcher once -c "{config}"\n'
             f'dd if=/dev/zero of="{state_dir}/filler" bs=64k 2>/dev/null || true\n'
             f'exec "{python}" -m watcher run -c "{config}"'],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        wait_until(lambda: "waiting for space" in log_path.read_text(), 30, "the daemon waiting for space")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        (Path(f"/proc/{proc.pid}/root") / state_dir.relative_to("/") / "filler").unlink()
        wait_until(lambda: "state file opens again" in log_path.read_text(), 30, "the daemon to start")
        wait_until(lambda: '"event": "poll"' in log_path.read_text(), 30, "a first poll")
        more = simulator.add_leads(2, simulator.campaign_ids()[0])
        wait_until(lambda: set(more) <= _created_leads(receiver), 30, "leads delivered after the wait")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
