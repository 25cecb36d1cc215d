"""Fault injection: SIGKILL chaos, a misbehaving API, a long receiver outage, a full or read-only state directory.

Every test drives the real CLI in subprocesses against the simulator and receivers on loopback.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import serving
from tests.support.daemon import WEBHOOK_KEY, Daemon, cli, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver, verify_request
from tests.support.schemas import validate_event
from watcher.simulator import Simulator, SimulatorServer

pytestmark = pytest.mark.faults


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=11, campaigns=4, leads=30) as pair:
        yield pair


def _received(receiver: Receiver) -> list[dict[str, Any]]:
    """Every verified body, with its webhook-id attached."""
    posts = [r for r in receiver.requests if r.method == "POST"]  # one snapshot: requests keep arriving
    out = []
    for r in posts:
        body = verify_request(r, WEBHOOK_KEY, check_timestamp=False)
        validate_event(body)
        out.append({**body, "_id": r.headers["webhook-id"]})
    return out


def _change_key(event: dict[str, Any]) -> tuple[Any, ...]:
    data = event["data"]
    if event["type"].startswith("lead."):
        return (event["type"], data["lead"]["id"], json.dumps(data.get("changes"), sort_keys=True))
    return (event["type"], data["campaign"]["id"], data.get("from"), data.get("to"))


def _assert_same_change_same_id(events: list[dict[str, Any]]) -> None:
    ids: dict[tuple[Any, ...], set[str]] = defaultdict(set)
    for event in events:
        ids[_change_key(event)].add(event["_id"])
    split = {k: v for k, v in ids.items() if len(v) > 1}
    assert not split, f"one change sent under several webhook-ids: {list(split)[:3]}"


def _latest_score(events: list[dict[str, Any]], lead_id: int) -> Any:
    about = [e for e in events if e["type"].startswith("lead.") and e["data"]["lead"]["id"] == lead_id]
    return about[-1]["data"]["lead"].get("score") if about else None


def _integrity(path: Path) -> str:
    # Raw on purpose: the subject is the file's pages, checked without the Store's schema-version gate.
    with sqlite3.connect(path) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def test_sigkill_chaos_loses_nothing(tmp_path: Path, sim, receiver: Receiver) -> None:
    """Ten SIGKILLs at random moments while leads, updates and campaign changes stream in: nothing lost."""
    simulator, server = sim
    rng = random.Random(2026)
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url, retry_schedule=["250ms"] * 20)],
        convertr={"items_per_page": 4},
        leads={"updates": True, "lookback": "1m"},
        campaigns={"enabled": True, "interval": 1},
    )
    assert cli("once", "-c", str(config)).returncode == 0  # the baseline
    campaign_ids = simulator.campaign_ids()
    created: list[int] = []
    final_score: dict[int, int] = {}
    paused = campaign_ids[0]
    initial_status = simulator.campaign(paused)["status"]
    for round_ in range(10):
        daemon = Daemon(config).start()
        created += simulator.add_leads(rng.randint(2, 6), rng.choice(campaign_ids))
        for lead_id in rng.sample(created, min(3, len(created))):
            score = rng.randint(0, 99)
            simulator.update_lead(lead_id, score=score)
            final_score[lead_id] = score
        if round_ == 3:
            simulator.pause_campaign(paused)
            daemon.wait_polls(1, "campaigns")
        if round_ == 7:
            simulator.resume_campaign(paused)
            daemon.wait_polls(1, "campaigns")
        wait_until(lambda d=daemon: d.polls() > 0 or not d.running(), 20, "a first poll")
        kill_after = rng.uniform(0.05, 1.2)
        with pytest.raises(subprocess.TimeoutExpired):
            assert daemon.proc is not None
            daemon.proc.wait(kill_after)  # a random moment: mid-walk, mid-delivery or idle
        daemon.kill()
    with Daemon(config) as daemon:
        daemon.wait_polls(2)
        daemon.wait_polls(2, "campaigns")

        def settled() -> bool:
            events = _received(receiver)
            got = {e["data"]["lead"]["id"] for e in events if e["type"] == "lead.created"}
            scores_ok = all(_latest_score(events, i) == s for i, s in final_score.items())
            return set(created) <= got and scores_ok

        wait_until(settled, 40, "every lead created and every final score")
        assert daemon.stop() == 0
    events = _received(receiver)
    _assert_same_change_same_id(events)
    transitions = [
        (e["data"]["from"], e["data"]["to"])
        for e in events
        if e["type"] == "campaign.status_changed" and e["data"]["campaign"]["id"] == paused
    ]
    assert (initial_status, "Paused") in transitions and ("Paused", initial_status) in transitions
    assert _integrity(tmp_path / "state.db") == "ok"


def test_api_faults_mixed(tmp_path: Path, sim, receiver: Receiver) -> None:
    """5xx at 20 %, 429s, truncated bodies, expiring tokens and schema drift: the daemon keeps going, loses nothing."""
    simulator, server = sim
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url)],
        convertr={"items_per_page": 5, "timeout": "2s"},
        leads={"updates": True},
    )
    campaign = simulator.campaign_ids()[0]
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        simulator.faults.update({"error_rate": 0.2, "malformed_rate": 0.1, "latency": 0.02, "schema_drift": True})
        created: list[int] = []
        for step in range(4):
            created += simulator.add_leads(3, campaign)
            if step == 0:
                simulator.faults.update({"rate_limit_429": 3, "retry_after": 1})
            if step == 2:
                simulator.expire_tokens()
            daemon.wait_polls(1, timeout=60)
        updated = created[:4]
        for lead_id in updated:
            simulator.update_lead(lead_id, qaResult="Invalid")
        daemon.wait_polls(2, timeout=60)
        simulator.faults.update({"error_rate": 0.0, "malformed_rate": 0.0, "latency": 0.0, "schema_drift": False})
        daemon.wait_polls(2)

        def all_there() -> bool:
            events = _received(receiver)
            got = {e["data"]["lead"]["id"] for e in events if e["type"] == "lead.created"}
            invalid = {
                e["data"]["lead"]["id"]
                for e in events
                if (e["data"]["lead"].get("qaResult") or {}).get("name") == "Invalid"
            }
            return set(created) <= got and set(updated) <= invalid

        wait_until(all_there, 40, "every lead and every QA change despite the faults")
        assert daemon.running()
        assert daemon.stop() == 0
    events = _received(receiver)
    _assert_same_change_same_id(events)
    spurious = [e for e in events if e["type"] == "lead.updated" and e["data"]["lead"]["id"] not in updated]
    assert spurious == [], "schema drift must not read as a change"
    changed = {k for e in events if e["type"] == "lead.updated" for k in e["data"]["changes"]}
    assert "qaResult" in changed
    assert not changed & {"score", "leadFlag", "futureField"}, "fields that only came and went with the drift"
    assert "Traceback" not in daemon.log() or "poll failed" in daemon.log()


def test_proxy_403_at_login_is_ridden_out(tmp_path: Path, sim, receiver: Receiver) -> None:
    """HTML 403 pages at login (a firewall or maintenance page) fail polls visibly but never end the daemon."""
    simulator, server = sim
    start = simulator.now().isoformat()
    campaign = simulator.campaign_ids()[0]
    simulator.faults.login_html_403 = 1_000_000
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url)],
        # An explicit zone: this test is about logins, not about learning the server's zone.
        convertr={"timezone": "Europe/London"},
        leads={"start": start},
    )

    def delivered() -> set[int]:
        return {e["data"]["lead"]["id"] for e in _received(receiver) if e["type"] == "lead.created"}

    with Daemon(config) as daemon:
        during = simulator.add_leads(3, campaign)

        def failed_poll() -> str:
            cursor = daemon.read(lambda store: store.cursor("leads.created"), None)
            return (cursor.last_error or "") if cursor is not None else ""

        # The client's own retries (about 10 s of backoff) end, the poll fails, the daemon stays.
        error = wait_until(lambda: failed_poll() or not daemon.running(), 60, "a poll failed by the 403 page")
        assert daemon.running(), f"the daemon ended on a proxy page:\n{daemon.log()[-3000:]}"
        assert error.startswith("Convertr POST /api/login: 403 with a text/html body"), error
        status = cli("status", "-c", str(config), "--json")
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)["streams"][0]
        assert shown["stream"] == "leads.created" and "403 with a text/html body" in shown["last_error"]

        simulator.faults.login_html_403 = 0  # the maintenance page goes away
        wait_until(lambda: set(during) <= delivered(), 60, "the leads created while logins were refused")
        # Tokens expiring, and the one relogin that follows meeting the page once more.
        simulator.expire_tokens()
        simulator.faults.login_html_403 = 1
        after = simulator.add_leads(3, campaign)
        wait_until(lambda: set(after) <= delivered(), 60, "the leads created after a relogin met a 403 page")
        assert simulator.faults.login_html_403 == 0, "the second 403 page was served"
        assert daemon.stop() == 0
    assert '"fatal"' not in daemon.log()
    assert [e["_id"] for e in _received(receiver) if e["type"] == "lead.created"].__len__() == len(delivered())


def test_receiver_outage_of_several_retry_periods(tmp_path: Path, sim, receiver: Receiver) -> None:
    """A receiver down for several retry periods gets everything, in order per lead, after it recovers."""
    simulator, server = sim
    receiver.respond(503)
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url, retry_schedule=["500ms"] * 30, concurrency=2)],
        leads={"updates": True},
    )
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        ids = simulator.add_leads(5, simulator.campaign_ids()[0])
        daemon.wait_polls(2)
        simulator.update_lead(ids[0], score=1)
        # several retry periods of refusals for every queued event
        receiver.wait_for(lambda reqs: sum(r.status == 503 for r in reqs) >= 5 * 4, 30, "four refusals per event")
        receiver.respond(200)
        wait_until(
            lambda: (
                {r.json()["data"]["lead"]["id"] for r in receiver.requests if r.status == 200} >= set(ids)
                and any(r.json()["type"] == "lead.updated" and r.status == 200 for r in receiver.requests)
            ),
            30,
            "everything after recovery",
        )
        assert daemon.stop() == 0
    first_lead = [
        r.json()["type"] for r in receiver.requests if r.status == 200 and r.json()["data"]["lead"]["id"] == ids[0]
    ]
    assert first_lead == ["lead.created", "lead.updated"]


def _integrity_cmd(db: Path, mode: str = "rw") -> str:
    # Raw on purpose: run inside the namespace that mounts the state folder, on the file's pages themselves.
    code = (
        f"import sqlite3; c = sqlite3.connect('file:{db}?mode={mode}', uri=True); "
        "print('integrity=' + c.execute('PRAGMA integrity_check').fetchone()[0])"
    )
    return f'{sys.executable} -c "{code}"'


def _in_namespace(script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script in a private mount namespace (so it may mount a small tmpfs)."""
    assert shutil.which("unshare"), "util-linux unshare is needed for the state-directory fault tests"
    return subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-euc", script],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_state_directory_full(tmp_path: Path, sim) -> None:
    """A state directory that fills up mid-backfill: a clear error, a non-zero exit, an intact file."""
    simulator, server = sim
    simulator.add_leads(3000, simulator.campaign_ids()[0])
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = write_config(tmp_path, server.url, [], leads={"start": "2000-01-01T00:00:00Z"})
    config.write_text(config.read_text().replace('path = "state.db"', f'path = "{state_dir}/state.db"'))
    result = _in_namespace(
        f"""
        mount -t tmpfs -o size=400k tmpfs {state_dir}
        set +e
        {sys.executable} -m watcher once -c {config} 2>{tmp_path}/stderr
        echo "exit=$?"
        {_integrity_cmd(state_dir / "state.db")}
        """
    )
    assert result.returncode == 0, result.stderr
    stderr = (tmp_path / "stderr").read_text()
    assert "exit=1" in result.stdout, (result.stdout, stderr)
    assert "integrity=ok" in result.stdout
    assert "full" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_state_directory_read_only(tmp_path: Path, sim) -> None:
    """A state directory that turned read-only: a clear error, a non-zero exit, an intact file."""
    _simulator, server = sim
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = write_config(tmp_path, server.url, [])
    config.write_text(config.read_text().replace('path = "state.db"', f'path = "{state_dir}/state.db"'))
    result = _in_namespace(
        f"""
        mount -t tmpfs -o size=4m tmpfs {state_dir}
        {sys.executable} -m watcher once -c {config}
        mount -o remount,ro {state_dir}
        set +e
        {sys.executable} -m watcher once -c {config} 2>{tmp_path}/stderr
        echo "exit=$?"
        {_integrity_cmd(state_dir / "state.db", "ro&immutable=1")}
        """
    )
    assert result.returncode == 0, result.stderr
    stderr = (tmp_path / "stderr").read_text()
    assert "exit=1" in result.stdout, (result.stdout, stderr)
    assert "integrity=ok" in result.stdout
    assert "read" in stderr.lower() and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_sigterm_during_backfill_resumes_without_duplicates(tmp_path: Path, sim, receiver: Receiver) -> None:
    """SIGTERM in the middle of a large backfill: exit 0, and the next run finishes it with no id sent twice."""
    simulator, server = sim
    ids = simulator.add_leads(1000, simulator.campaign_ids()[0])
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url, concurrency=8)],
        convertr={"items_per_page": 50},
        leads={"start": "2000-01-01T00:00:00Z"},
    )
    with Daemon(config) as daemon:
        wait_until(lambda: daemon.read(lambda store: store.lead_count(), 0) > 150, 30, "part of the backfill")
        assert daemon.stop(signal.SIGTERM) == 0
    assert (tmp_path / "state.db").exists()
    everything = set(simulator.lead_ids())  # the seeded history is part of the backfill too
    assert everything >= set(ids)
    with Daemon(config) as daemon:
        wait_until(
            lambda: {e["data"]["lead"]["id"] for e in _received(receiver)} >= everything, 60, "the rest of the backfill"
        )
        assert daemon.stop() == 0
    events = _received(receiver)
    _assert_same_change_same_id(events)
