"""An operator's day over the real CLI: reload on SIGHUP, stranded queues, retry now, privacy by value,
quiet bursts, and commands that say what is true (issue 14)."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import serving
from tests.support.daemon import (
    WEBHOOK_KEY,
    WEBHOOK_KEY_2,
    Daemon,
    cli,
    events_json,
    wait_until,
    webhook_sink,
    write_config,
)
from tests.support.receiver import FakeSlack, Receiver, Reply, verify_request
from watcher.runinfo import read_info
from watcher.simulator import Simulator, SimulatorServer
from watcher.state.migrations import MIGRATIONS


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=14, campaigns=2, leads=6) as pair:
        yield pair


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(config: Path) -> dict[str, Any]:
    result = cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    # The JSON document is the output's last lines: a warning logged on the way may precede it.
    lines = result.stdout.splitlines()
    data = json.loads("\n".join(lines[lines.index("{") :]))
    assert isinstance(data, dict)
    return data


def sinks_of(config: Path) -> dict[str, dict[str, Any]]:
    return {s["sink"]: s for s in status(config)["sinks"]}


def ids(receiver: Receiver) -> list[str]:
    return [r.headers["webhook-id"] for r in receiver.requests if r.status is not None and r.status < 300]


def deliveries(daemon: Daemon, sink: str) -> list[tuple[str, str, int]]:
    """(event id, status, attempts) of the sink's deliveries, oldest first."""
    rows = daemon.read(lambda store: store.deliveries(sink), [])
    return [(r["event_id"], r["status"], int(r["attempts"])) for r in rows]


def delivered(daemon: Daemon) -> int:
    """Deliveries marked delivered, over every sink."""
    return daemon.read(lambda store: sum(s.delivered for s in store.sink_states(())), 0)


# --- 2. SIGHUP reloads ------------------------------------------------------------------------


def test_sighup_applies_new_sinks_and_secret_files_and_refuses_a_broken_file(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer]
) -> None:
    """A HUP applies a new sink list and a rotated secret file; a broken file is refused and the old config runs on."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    secret = tmp_path / "secret"
    secret.write_text(WEBHOOK_KEY + "\n")
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(0.2)
    messages: list[str] = []
    done = threading.Event()

    def read_notifications() -> None:
        # Read as systemd does: a full datagram queue would block the daemon's sends.
        while not done.is_set():
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return  # closed by the test's end

    reader = threading.Thread(target=read_notifications, daemon=True)
    reader.start()
    with Receiver() as first, Receiver() as second, listener:
        config = write_config(tmp_path, server.url, [webhook_sink(first.url, "crm")])
        with Daemon(config, env={"NOTIFY_SOCKET": str(notify)}) as daemon:
            daemon.wait_polls(1)
            simulator.add_lead(campaign)
            first.wait_for_count(1, 15)
            before = status(config)["daemon"]
            assert before["reloads"] == 0 and before["config_changed"] is False

            sink = {"name": "crmprod", "type": "webhook", "url": second.url, "secret_file": str(secret)}
            write_config(tmp_path, server.url, [{**sink, "retry_schedule": ["1s"]}])
            daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(lambda: "configuration reloaded" in daemon.log(), 15, "the reload")
            simulator.add_lead(campaign)
            second.wait_for_count(1, 15)
            assert verify_request(second.requests[0], WEBHOOK_KEY)["type"] == "lead.created"
            after = status(config)["daemon"]
            assert after["reloads"] == 1 and after["config_fingerprint"] != before["config_fingerprint"]

            secret.write_text(WEBHOOK_KEY_2 + "\n")
            daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(lambda: daemon.log().count("configuration reloaded") == 2, 15, "the second reload")
            simulator.add_lead(campaign)
            second.wait_for_count(2, 15)
            assert verify_request(second.requests[1], WEBHOOK_KEY_2)["type"] == "lead.created", "the new key signs"

            config.write_text(config.read_text() + "\n[nonsense\n")
            daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(lambda: "reload REFUSED" in daemon.log(), 15, "the refusal")
            assert daemon.running()
            simulator.add_lead(campaign)
            second.wait_for_count(3, 15)
            # `status` cannot read the broken file either: the daemon's own record says what happened.
            refused = read_info(tmp_path / "state.db")
            assert refused is not None and "invalid TOML" in refused["reload_refused"] and refused["reloads"] == 2
            assert daemon.stop() == 0
        assert len(first.requests) == 1, "the removed sink got nothing after the reload"
        refusals = [line for line in daemon.log().splitlines() if "reload REFUSED" in line]
        assert len(refusals) == 1
        done.set()
        reader.join(5)
    reloading = [i for i, m in enumerate(messages) if "RELOADING=1" in m]
    assert len(reloading) == 3 and all("MONOTONIC_USEC=" in messages[i] for i in reloading)
    assert all(any("READY=1" in m for m in messages[i + 1 :]) for i in reloading), "each reload ends in READY=1"


# --- 3. no stranded queue ---------------------------------------------------------------------


def test_a_renamed_sinks_backlog_is_flagged_counted_and_moved_with_from_sink(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer]
) -> None:
    """A renamed sink's backlog is flagged (status, metrics, log) and `replay --from-sink` delivers it, same ids."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    port = free_port()
    metrics = f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    with Receiver() as down, Receiver() as good:
        down.respond(500)
        config = write_config(tmp_path, server.url, [webhook_sink(down.url, "crm", retry_schedule=["1h"])])
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            simulator.add_leads(3, campaign)
            wait_until(lambda: len([d for d in deliveries(daemon, "crm") if d[2] == 1]) == 3, 15, "three failures")
            assert daemon.stop() == 0
        stranded = [eid for eid, _status, _n in deliveries(daemon, "crm")]

        write_config(tmp_path, server.url, [webhook_sink(good.url, "crmprod")], extra=metrics)
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            assert any("no longer configured" in line and '"crm"' in line for line in daemon.log().splitlines())
            crm = sinks_of(config)["crm"]
            assert crm["stranded"] is True and crm["pending"] == 3
            assert "STRANDED" in cli("status", "-c", str(config)).stdout
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            assert 'watcher_outbox_stranded{sink="crm"} 3.0' in scrape

            moved = cli("replay", "-c", str(config), "--sink", "crmprod", "--from-sink", "crm")
            assert moved.returncode == 0 and "moved 3 deliveries" in moved.stdout, moved.stderr
            wait_until(lambda: len(ids(good)) == 3, 10, "the moved backlog")
            assert sorted(ids(good)) == sorted(stranded), "same event ids under the new name"
            assert "crm" not in sinks_of(config) or sinks_of(config)["crm"]["stranded"] is False
            assert daemon.stop() == 0


# --- 4. retry now -----------------------------------------------------------------------------


def test_replay_pending_sends_a_backoff_backlog_now_and_a_shorter_schedule_applies_at_start(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer]
) -> None:
    """`replay --pending` sends hour-long waits in seconds, ids and counts kept; a shorter schedule applies at start."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    with Receiver() as receiver:
        receiver.respond(503)
        config = write_config(tmp_path, server.url, [webhook_sink(receiver.url, retry_schedule=["1h", "1h"])])
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            simulator.add_leads(2, campaign)
            wait_until(lambda: [n for _e, _s, n in deliveries(daemon, "crm")] == [1, 1], 15, "two failed attempts")
            receiver.respond(200)
            result = cli("replay", "-c", str(config), "--pending", "--sink", "crm")
            assert result.returncode == 0 and "made 2 waiting deliveries due" in result.stdout, result.stderr
            wait_until(lambda: len(ids(receiver)) == 2, 5, "the backlog, within seconds")
            wait_until(
                lambda: [(s, n) for _e, s, n in deliveries(daemon, "crm")] == [("delivered", 2)] * 2, 5, "recorded"
            )
            assert sorted(ids(receiver)) == sorted(e for e, _s, _n in deliveries(daemon, "crm"))

            receiver.respond(503)
            simulator.add_lead(campaign)
            wait_until(lambda: [n for _e, s, n in deliveries(daemon, "crm") if s == "pending"] == [1], 15, "a failure")
            assert daemon.stop() == 0
        receiver.respond(200)
        write_config(tmp_path, server.url, [webhook_sink(receiver.url, retry_schedule=["1s"])])
        with Daemon(config) as daemon:
            wait_until(lambda: len(ids(receiver)) == 3, 15, "the waiting retry on the new, shorter schedule")
            assert "re-timed" in daemon.log()
            assert daemon.stop() == 0


# --- 5. privacy by value ----------------------------------------------------------------------


def test_no_email_or_phone_reaches_a_sink_without_pii_whatever_the_field_is_called(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer]
) -> None:
    """E-mail addresses and phone numbers under any field name never reach a Slack or webhook sink without PII."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    email, phone = "boss.person@corp.example", "+44 20 7946 0958"
    with FakeSlack() as slack, Receiver() as hook:
        sinks = [
            {"name": "team", "type": "slack", "url": slack.url, "retry_schedule": ["1s"]},
            webhook_sink(hook.url, "crm", include_pii=False),
        ]
        config = write_config(tmp_path, server.url, sinks, leads={"updates": True})
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            lead = simulator.add_lead(campaign, lead_data={"Manager": email, "Reach me on": "n/a"})["id"]
            slack.wait_for_count(1, 15)
            hook.wait_for_count(1, 15)
            simulator.update_lead(lead, lead_data={"Manager": "someone.else@corp.example", "Reach me on": phone})
            simulator.update_lead(lead, score=77, lead_data={"jobTitle": f"CTO, call {phone}"})
            wait_until(lambda: delivered(daemon) >= 4, 20, "updates")
            assert daemon.stop() == 0
        sent = json.dumps(slack.messages(), ensure_ascii=False) + json.dumps(
            hook.verified_events(WEBHOOK_KEY), ensure_ascii=False
        )
    assert "corp.example" not in sent and "7946" not in sent
    assert "77" in sent, "the non-personal change still goes out"


# --- 6. quiet bursts --------------------------------------------------------------------------


def test_a_backfill_of_400_leads_costs_at_most_three_slack_messages(tmp_path: Path) -> None:
    """400 leads backfilled from a past start reach Slack in at most three digests that count all 400."""
    with serving(seed=6, campaigns=2, leads=0) as (simulator, server), FakeSlack() as slack:
        start = simulator.now() - timedelta(minutes=5)
        simulator.add_leads(400, simulator.campaign_ids()[0], created=simulator.now() - timedelta(minutes=1))
        sink = {"name": "team", "type": "slack", "url": slack.url, "retry_schedule": ["1s"]}
        config = write_config(tmp_path, server.url, [sink], leads={"start": start.isoformat(), "lookback": "10m"})
        with Daemon(config) as daemon:
            wait_until(
                lambda: delivered(daemon) == 400,
                60,
                "400 delivered",
            )
            assert daemon.stop() == 0
        messages = slack.messages()
    assert 1 <= len(messages) <= 3, f"{len(messages)} Slack messages for one backfill"
    assert sum(int(m["text"].split(" ")[0]) for m in messages) == 400
    assert all(len(m["blocks"]) <= 50 for m in messages)


def test_a_slack_429_pauses_every_sink_posting_to_that_hook(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer]
) -> None:
    """Two sinks on one hook: after a 429 with Retry-After: 3 neither posts to that hook for three seconds."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    with FakeSlack() as slack:
        slack.respond_sequence([Reply(429, b"rate_limited", {"retry-after": "3", "content-type": "text/plain"})])
        sinks = [
            {"name": n, "type": "slack", "url": slack.url, "retry_schedule": ["100ms"] * 5} for n in ("team", "ops")
        ]
        config = write_config(tmp_path, server.url, sinks)
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            simulator.add_lead(campaign)
            slack.wait_for_count(3, 20)
            assert daemon.stop() == 0
        times = slack.arrival_times()
    assert all(t - times[0] >= 2.9 for t in times[1:]), "the other sink waited out the same hook's pause"


# --- 7. say what is true ----------------------------------------------------------------------


def test_disabled_sinks_are_reported_and_edits_re_enable_them(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer]
) -> None:
    """An off sink queues nothing; status, send-test and check --connect say so; any edit re-enables a refused sink."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    with Receiver() as gone, Receiver() as idle:
        gone.respond(410)
        sinks = [webhook_sink(gone.url, "crm"), webhook_sink(idle.url, "spare", enabled=False)]
        config = write_config(tmp_path, server.url, sinks)
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            simulator.add_lead(campaign)
            wait_until(lambda: sinks_of(config).get("crm", {}).get("disabled"), 15, "crm disabled by the 410")
            daemon.wait_polls(1)
            assert daemon.stop() == 0
        table = cli("status", "-c", str(config)).stdout
        assert any(line.startswith("spare ") and line.rstrip().endswith("off") for line in table.splitlines()), table
        assert events_json(config, "--sink", "spare") == []
        connect = cli("check", "-c", str(config), "--connect")
        assert "sink crm: DISABLED by the daemon" in connect.stdout, connect.stdout
        test = cli("send-test", "-c", str(config), "--sink", "spare")
        assert "disabled in the configuration" in test.stdout
        assert "DISABLED by the daemon" in cli("send-test", "-c", str(config), "--sink", "crm").stdout

        gone.respond(204)
        edited = [webhook_sink(gone.url, "crm", timeout=7), webhook_sink(idle.url, "spare", enabled=False)]
        write_config(tmp_path, server.url, edited)
        with Daemon(config) as daemon:
            wait_until(lambda: len(ids(gone)) == 1, 15, "the edited sink's backlog")
            assert daemon.stop() == 0


def test_replay_never_creates_a_state_file_and_a_newer_schema_exits_78(tmp_path: Path) -> None:
    """`replay` without a state file refuses in one line, creating nothing; a newer-schema file makes `run` exit 78."""
    config = write_config(tmp_path, "http://127.0.0.1:9", [webhook_sink("http://127.0.0.1:9/hook")])
    result = cli("replay", "-c", str(config), "--all")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no state file" in result.stderr
    assert not (tmp_path / "state.db").exists()

    newer = len(MIGRATIONS) + 2
    # Raw on purpose: a file from a newer release is what no Store of this release can write.
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute(f"PRAGMA user_version = {newer}")
    conn.close()
    run = cli("run", "-c", str(config), timeout=30)
    assert run.returncode == 78, run.stderr
    assert f"schema version {newer}" in run.stderr and "Traceback" not in run.stderr
