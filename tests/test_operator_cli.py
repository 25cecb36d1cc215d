"""The smaller operator commands, each through the real CLI: `events --since 1h`, the next-attempt
column, `events show`, `events --follow`, `send-test --type`, `new-secret`, one `fatal` line, and
`replay` saying it enabled a disabled sink again."""

from __future__ import annotations

import base64
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.support.daemon import WEBHOOK_KEY, Daemon, cli, webhook_sink, write_config
from tests.support.receiver import Receiver, verify_request
from tests.support.schemas import schema_errors
from watcher.simulator import Simulator, SimulatorServer

BACKFILL = {"start": "2000-01-01T00:00:00Z", "lookback": "1d"}


def test_events_since_a_duration_and_the_next_attempt_column(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """`--since 1h` lists what was detected in the last hour and `--since 0s` nothing; pending rows
    show when their next attempt is due."""
    _simulator, server = sim
    receiver.respond(500)
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url, retry_schedule=["1h"])], leads=BACKFILL)
    assert cli("once", "-c", str(config)).returncode == 1  # every delivery failed once
    recent = cli("events", "-c", str(config), "--since", "1h", "--format", "json")
    assert recent.returncode == 0, recent.stderr
    rows = [json.loads(line) for line in recent.stdout.splitlines()]
    assert rows and all(r["status"] == "pending" and r["next_attempt_at"] for r in rows)
    none = cli("events", "-c", str(config), "--since", "0s", "--format", "json")
    assert none.returncode == 0 and none.stdout == ""
    table = cli("events", "-c", str(config), "--since", "90m").stdout.splitlines()
    assert "NEXT ATTEMPT" in table[0]
    assert rows[0]["next_attempt_at"] in table[1]


def test_events_show_prints_one_event_without_personal_data(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """`events show ID` prints the body and its deliveries, the lead's e-mail left out; an unknown id exits 1."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], leads=BACKFILL)
    assert cli("once", "-c", str(config)).returncode == 0
    sent = receiver.requests[0]
    email = sent.json()["data"]["lead"]["email"]
    result = cli("events", "-c", str(config), "show", sent.headers["webhook-id"])
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["id"] == sent.headers["webhook-id"] and shown["type"] == "lead.created"
    assert shown["body"]["data"]["lead"]["id"] == sent.json()["data"]["lead"]["id"]
    assert email not in result.stdout and "email" not in shown["body"]["data"]["lead"]
    assert [(d["sink"], d["status"]) for d in shown["deliveries"]] == [("crm", "delivered")]
    missing = cli("events", "-c", str(config), "show", "evt_nosuchevent")
    assert missing.returncode == 1 and "no event" in missing.stderr


def test_events_follow_prints_deliveries_as_they_happen(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """Beside a running daemon, `events --follow` prints a lead detected after it started, as delivered."""
    simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)])
    campaign = simulator.campaign_ids()[0]
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        before = int(simulator.add_lead(campaign)["id"])
        receiver.wait_for_count(1, 30)
        follower = subprocess.Popen(
            [sys.executable, "-m", "watcher", "events", "-c", str(config), "--follow", "--format", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()  # type: ignore[union-attr]
        seen: list[dict[str, object]] = []

        def wait_for_row(lead: int, status: str) -> dict[str, object]:
            deadline = time.monotonic() + 20
            while True:
                found = [r for r in seen if r["resource"] == f"lead:{lead}" and r["status"] == status]
                if found:
                    return found[-1]
                assert time.monotonic() < deadline, f"no {status} row for lead {lead} in {seen}"
                try:
                    seen.append(json.loads(lines.get(timeout=1)))
                except queue.Empty:
                    continue

        try:
            # The listing comes first: once it is printed, the follower watches for what is newer.
            wait_for_row(before, "delivered")
            lead = int(simulator.add_lead(campaign)["id"])
            receiver.wait_for_count(2, 30)
            assert wait_for_row(lead, "delivered")["id"] == receiver.requests[1].headers["webhook-id"]
        finally:
            follower.send_signal(signal.SIGINT)
            assert follower.wait(10) == 130
        assert "Traceback" not in follower.stderr.read()  # type: ignore[union-attr]


def test_send_test_sends_a_realistic_sample_of_a_type(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """`send-test --type lead.updated` delivers a signed body with a lead and its changes that meets the schema,
    without personal data for a sink that leaves it out, under a new id each time."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url, include_pii=False)])
    for _ in range(2):
        result = cli("send-test", "-c", str(config), "--sink", "crm", "--type", "lead.updated")
        assert result.returncode == 0, result.stderr
        assert "accepted: HTTP 200" in result.stdout
    bodies = [verify_request(r, WEBHOOK_KEY) for r in receiver.requests]
    for body in bodies:
        assert body["type"] == "lead.updated" and schema_errors(body) == []
        assert body["data"]["changes"] and body["data"]["lead"]["id"] >= 1
        assert "email" not in body["data"]["lead"]
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 2


def test_new_secret_prints_a_key_a_sink_accepts(tmp_path: Path) -> None:
    """`new-secret` prints whsec_ and 32 random bytes in base64, different each time, that `check` accepts."""
    first, second = (cli("new-secret") for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0
    key = first.stdout.strip()
    assert key.startswith("whsec_") and len(base64.b64decode(key.removeprefix("whsec_"))) == 32
    assert key != second.stdout.strip()
    config = write_config(tmp_path, "http://127.0.0.1:9", [webhook_sink("http://127.0.0.1:9/hook", secret=key)])
    assert cli("check", "-c", str(config)).returncode == 0


def test_a_refused_login_is_logged_fatal_once(tmp_path: Path, sim: tuple[Simulator, SimulatorServer]) -> None:
    """Both polls meet the refused login at start; the log says `fatal` once, and `run` exits 78."""
    _simulator, server = sim
    config = write_config(
        tmp_path, server.url, convertr={"password": "not-the-password-7c1"}, campaigns={"enabled": True}
    )
    result = cli("run", "-c", str(config), timeout=30)
    assert result.returncode == 78, result.stderr[-2000:]
    fatal = [line for line in result.stdout.splitlines() if json.loads(line)["event"] == "fatal"]
    assert len(fatal) == 1, result.stdout


def test_replay_says_it_enabled_a_disabled_sink_again(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """After a 410 disabled `crm`, `replay --sink crm` says the sink was disabled and is enabled again."""
    _simulator, server = sim
    receiver.respond(410)
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], leads=BACKFILL)
    assert cli("once", "-c", str(config)).returncode == 1
    result = cli("replay", "-c", str(config), "--sink", "crm")
    assert result.returncode == 0, result.stderr
    assert "sink crm was disabled by the daemon since" in result.stdout
    assert "410" in result.stdout and "enabled again" in result.stdout
    again = cli("replay", "-c", str(config), "--sink", "crm")
    assert "enabled again" not in again.stdout, "an enabled sink is not reported as re-enabled"
