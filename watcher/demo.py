"""`convertr-watcher demo`: the whole product on loopback in one command.

The simulator (seeded, with a generator adding leads several times a second), the real daemon
(`convertr-watcher run` in a subprocess, with a fresh temporary state file) and a receiver that
verifies every request with the independent `standardwebhooks` library. While leads arrive the
demo also changes two leads (a QA result, a `leadData` value), adds a campaign and pauses and
resumes another, so every event type shows up. Each verified event is printed whole on its own
line as it arrives; the summary compares, type by type, what the simulator did with what arrived.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from watcher.errors import StateError
from watcher.events import CAMPAIGN_CREATED, CAMPAIGN_STATUS_CHANGED, LEAD_CREATED, LEAD_UPDATED
from watcher.exitcodes import EXIT_FAILURE, EXIT_OK
from watcher.poller import BASELINE, CAMPAIGNS, CREATED, UPDATED
from watcher.simulator import Simulator, SimulatorServer
from watcher.state.store import Store

DEMO_TYPES = (LEAD_CREATED, LEAD_UPDATED, CAMPAIGN_CREATED, CAMPAIGN_STATUS_CHANGED)
# The daemon polls every second: a change is normally delivered within two or three.
ARRIVAL_TIMEOUT = 20.0

# Receiver threads print concurrently: one lock and one write per line keep each line whole.
_print_lock = threading.Lock()


def say(line: str = "", *, err: bool = False) -> None:
    """Print one whole line, never interleaved with another thread's."""
    stream = sys.stderr if err else sys.stdout
    with _print_lock:
        stream.write(line + "\n")
        stream.flush()


def marks(event: dict[str, Any]) -> list[tuple[str, Hashable]]:
    """What an event proves arrived, in the terms the demo expects: (type, resource and change)."""
    kind, data = event.get("type", ""), event.get("data") or {}
    lead, campaign = data.get("lead") or {}, data.get("campaign") or {}
    if kind == LEAD_CREATED:
        return [(kind, lead.get("id"))]
    if kind == LEAD_UPDATED:
        return [(kind, (lead.get("id"), field)) for field in data.get("changes") or {}]
    if kind == CAMPAIGN_CREATED:
        return [(kind, campaign.get("id"))]
    if kind == CAMPAIGN_STATUS_CHANGED:
        return [(kind, (campaign.get("id"), data.get("to")))]
    return []


class VerifyingReceiver:
    """A webhook receiver on 127.0.0.1 that accepts only requests whose signature verifies."""

    def __init__(self, secret: str, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.webhook = Webhook(secret)
        self.on_event = on_event
        self.cond = threading.Condition()
        self.ids: Counter[str] = Counter()
        self.types: Counter[str] = Counter()
        self.seen: set[tuple[str, Hashable]] = set()
        self.verified = 0
        self.rejected = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    event = receiver.webhook.verify(body, {k.lower(): v for k, v in self.headers.items()})
                except WebhookVerificationError:
                    with receiver.cond:
                        receiver.rejected += 1
                    self._answer(400)
                    return
                msg_id = self.headers["webhook-id"]
                with receiver.cond:
                    receiver.verified += 1
                    first = receiver.ids[msg_id] == 0
                    receiver.ids[msg_id] += 1
                if first:
                    # Printed before it counts as arrived, so its line is out before the summary.
                    receiver.on_event(event)
                    with receiver.cond:
                        receiver.types[event.get("type", "")] += 1
                        receiver.seen.update(marks(event))
                        receiver.cond.notify_all()
                self._answer(204)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_for(self, wanted: set[tuple[str, Hashable]], timeout: float) -> bool:
        """Block until every mark in `wanted` has arrived (True) or `timeout` passes (False)."""
        with self.cond:
            return self.cond.wait_for(lambda: wanted <= self.seen, timeout)

    def __enter__(self) -> VerifyingReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _config(folder: Path, api: str, username: str, password: str, hook: str, secret: str) -> Path:
    path = folder / "demo.toml"
    path.write_text(
        f"""
[convertr]
base_url = "{api}"
username = "{username}"
password = "{password}"

[state]
path = "state.db"

[leads]
interval = "1s"
lookback = "30s"
updates = true
start = "now"

[campaigns]
enabled = true
interval = "1s"

[log]
format = "json"

[[sinks]]
name = "demo-receiver"
type = "webhook"
url = "{hook}"
secret = "{secret}"
events = {json.dumps(list(DEMO_TYPES))}
retry_schedule = ["1s", "2s", "5s", "10s"]
"""
    )
    return path


def _ready(state: Path) -> bool:
    """Whether every stream the demo uses has finished its first walk (the snapshot baseline too)."""
    if not state.exists():
        return False
    try:
        store = Store.open_readonly(state)
    except StateError:  # not created or migrated yet
        return False
    try:
        done = {c.stream for c in store.cursors() if c.last_success_at}
    except StateError:
        return False
    finally:
        store.close()
    return {CREATED, UPDATED, BASELINE, CAMPAIGNS} <= done


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _value(value: Any) -> str:
    """A changed value as one short token: a QA result or flag by its name, anything else as JSON."""
    if isinstance(value, dict) and "name" in value:
        return str(value["name"])
    return json.dumps(value, ensure_ascii=False)


def describe(event: dict[str, Any], campaigns: dict[int, str]) -> str:
    """One line for one event: the lead or campaign, and the diff or the transition."""
    kind, data = event["type"], event.get("data") or {}
    if "lead" in data:
        lead = data["lead"]
        campaign = str(lead.get("campaign", "")).rsplit("/", 1)[-1]
        where = f"campaign {campaign} {campaigns.get(int(campaign), '')}" if campaign.isdigit() else ""
        text = f"lead {lead.get('id')!s:<6} {where}".rstrip()
        if kind == LEAD_UPDATED:
            diff = ", ".join(f"{k}: {_value(c['from'])} -> {_value(c['to'])}" for k, c in data["changes"].items())
            text = f"lead {lead.get('id')!s:<6} {diff}"
    else:
        doc: dict[str, Any] = data.get("campaign") or {}
        text = f"campaign {doc.get('id')} {doc.get('name', '')}"
        if kind == CAMPAIGN_STATUS_CHANGED:
            text += f": {data.get('from')} -> {data.get('to')}"
        elif kind == CAMPAIGN_CREATED:
            text += f" ({doc.get('status')})"
    return f"{datetime.now(UTC):%H:%M:%S}  {kind:<23} {text}"


class _Changes:
    """What the demo did to the simulator: the marks it expects to arrive, by type."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.expected: dict[str, set[Hashable]] = {kind: set() for kind in DEMO_TYPES}

    def expect(self, kind: str, key: Hashable) -> tuple[str, Hashable]:
        with self.lock:
            self.expected[kind].add(key)
        return kind, key

    def all(self) -> set[tuple[str, Hashable]]:
        with self.lock:
            return {(kind, key) for kind, keys in self.expected.items() for key in keys}


def _script(
    sim: Simulator, receiver: VerifyingReceiver, changes: _Changes, seeded: list[int], duration: float, seed: int
) -> None:
    """Change two seeded leads, add a campaign, pause and resume an active one, spread over `duration`."""
    started = time.monotonic()

    def at(share: float) -> None:
        time.sleep(max(0.0, started + share * duration - time.monotonic()))

    # Seeded leads, whose snapshots the baseline took: a lead changed before the daemon has seen
    # it at all is simply created in its changed state.
    leads = random.Random(seed + 1).sample(seeded, 2)
    at(0.15)
    qa = (sim.lead(leads[0]).get("qaResult") or {}).get("name")
    sim.update_lead(leads[0], qaResult="Caution" if qa == "Valid" else "Valid")
    changes.expect(LEAD_UPDATED, (leads[0], "qaResult"))
    at(0.3)
    sim.update_lead(leads[1], lead_data={"jobTitle": "Chief Data Officer"})
    changes.expect(LEAD_UPDATED, (leads[1], "leadData.jobTitle"))
    at(0.4)
    changes.expect(CAMPAIGN_CREATED, int(sim.add_campaign()["id"]))
    active = [i for i in sim.campaign_ids() if sim.campaign(i)["status"] == "Active"]
    if not active:
        return
    campaign = active[0]
    at(0.5)
    sim.pause_campaign(campaign)
    # The pause must be seen before the resume, or both fall between two polls and cancel out.
    if receiver.wait_for({changes.expect(CAMPAIGN_STATUS_CHANGED, (campaign, "Paused"))}, ARRIVAL_TIMEOUT):
        sim.resume_campaign(campaign)
        changes.expect(CAMPAIGN_STATUS_CHANGED, (campaign, "Active"))


def run_demo(duration: float = 30.0, seed: int = 0, rate: float = 4.0) -> int:
    username, password = "demo@example.com", "demo-password"
    secret = "whsec_" + base64.b64encode(random.Random(seed).randbytes(32)).decode()
    sim = Simulator(seed=seed, username=username, password=password)
    sim.seed_data(campaigns=3, leads=20)
    campaigns = {i: str(sim.campaign(i)["name"]) for i in sim.campaign_ids()}
    seeded = sim.lead_ids()
    changes = _Changes()

    with (
        tempfile.TemporaryDirectory(prefix="convertr-watcher-demo-") as tmp,
        SimulatorServer(sim) as api,
        VerifyingReceiver(secret, lambda event: say(describe(event, campaigns))) as receiver,
    ):
        folder = Path(tmp)
        config = _config(folder, api.url, username, password, receiver.url, secret)
        say(f"simulator {api.url}  receiver {receiver.url}  state {folder / 'state.db'}")
        log_file = (folder / "daemon.log").open("w")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "watcher", "run", "-c", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            if not _wait(lambda: _ready(folder / "state.db") or daemon.poll() is not None, 30):
                say("the daemon did not finish its baseline in 30 s", err=True)
                return EXIT_FAILURE
            if daemon.poll() is not None:
                say((folder / "daemon.log").read_text()[-2000:], err=True)
                return EXIT_FAILURE
            say(
                f"daemon ready; adding about {rate:g} leads a second for {duration:g} s, changing two leads, "
                "adding a campaign, pausing and resuming another"
            )
            script = threading.Thread(
                target=_script, args=(sim, receiver, changes, seeded, duration, seed), name="demo-script", daemon=True
            )
            script.start()
            rng = random.Random(seed)
            ids = list(campaigns)
            end = time.monotonic() + duration
            while time.monotonic() < end:
                changes.expect(LEAD_CREATED, sim.add_lead(rng.choice(ids))["id"])
                time.sleep(rng.expovariate(rate))
            script.join(ARRIVAL_TIMEOUT * 2)
            receiver.wait_for(changes.all(), ARRIVAL_TIMEOUT)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait()
            log_file.close()
        return _summary(receiver, changes, code)


def _summary(receiver: VerifyingReceiver, changes: _Changes, code: int) -> int:
    """Print the per-type counts and the totals; 0 when nothing expected is missing and nothing was rejected."""
    with receiver.cond:
        seen, types, ids = set(receiver.seen), Counter(receiver.types), Counter(receiver.ids)
        verified, rejected = receiver.verified, receiver.rejected
    missing: list[tuple[str, Hashable]] = []
    say()
    say(f"{'event type':<24} {'made':>5} {'received':>9} {'missing':>8}")
    for kind in DEMO_TYPES:
        expected = changes.expected[kind]
        gone = sorted((key for key in expected if (kind, key) not in seen), key=repr)
        missing += [(kind, key) for key in gone]
        say(f"{kind:<24} {len(expected):>5} {types[kind]:>9} {len(gone):>8}")
    duplicates = sum(n - 1 for n in ids.values() if n > 1)
    say()
    say(f"events received:                {sum(ids.values())} ({len(ids)} distinct ids)")
    say(f"signatures verified:            {verified} (rejected {rejected})")
    say(f"missing:                        {len(missing)}")
    say(f"duplicates:                     {duplicates}")
    say(f"daemon exit status:             {code}")
    if missing:
        say(f"missing: {missing[:20]}", err=True)
    return EXIT_OK if not missing and rejected == 0 else EXIT_FAILURE
