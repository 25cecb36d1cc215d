"""`convertr-watcher demo`: the whole product on loopback in one command.

The simulator (seeded, with a generator adding leads several times a second), the real daemon
(`convertr-watcher run` in a subprocess, with a fresh temporary state file) and a receiver that
verifies every request with the independent `standardwebhooks` library. Each verified event is
printed as it arrives; the summary compares what the simulator created with what arrived.
"""

from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from watcher.simulator import Simulator, SimulatorServer


class VerifyingReceiver:
    """A webhook receiver on 127.0.0.1 that accepts only requests whose signature verifies."""

    def __init__(self, secret: str, on_event: Any) -> None:
        from standardwebhooks.webhooks import Webhook

        self.webhook = Webhook(secret)
        self.on_event = on_event
        self.lock = threading.Lock()
        self.ids: Counter[str] = Counter()
        self.lead_ids: Counter[int] = Counter()
        self.verified = 0
        self.rejected = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    event = receiver.webhook.verify(body, {k.lower(): v for k, v in self.headers.items()})
                except Exception:
                    with receiver.lock:
                        receiver.rejected += 1
                    self._answer(400)
                    return
                with receiver.lock:
                    receiver.verified += 1
                    first = receiver.ids[self.headers["webhook-id"]] == 0
                    receiver.ids[self.headers["webhook-id"]] += 1
                    lead = event.get("data", {}).get("lead") or {}
                    if isinstance(lead.get("id"), int):
                        receiver.lead_ids[lead["id"]] += 1
                if first:
                    receiver.on_event(event)
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
updates = false
start = "now"

[campaigns]
enabled = false

[log]
format = "json"

[[sinks]]
name = "demo-receiver"
type = "webhook"
url = "{hook}"
secret = "{secret}"
events = ["lead.created"]
retry_schedule = ["1s", "2s", "5s", "10s"]
"""
    )
    return path


def _wait(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def run_demo(duration: float = 30.0, seed: int = 0, rate: float = 4.0) -> int:
    username, password = "demo@example.com", "demo-password"
    secret = "whsec_" + base64.b64encode(random.Random(seed).randbytes(32)).decode()
    sim = Simulator(seed=seed, username=username, password=password)
    sim.seed_data(campaigns=3, leads=20)
    campaigns = {i: str(sim.campaign(i)["name"]) for i in sim.campaign_ids()}

    def show(event: dict[str, Any]) -> None:
        lead = event["data"].get("lead", {})
        campaign = str(lead.get("campaign", "")).rsplit("/", 1)[-1]
        name = campaigns.get(int(campaign), "") if campaign.isdigit() else ""
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        print(f"{stamp}  {event['type']:<13} lead {lead.get('id')!s:<6} campaign {campaign} {name}", flush=True)

    with (
        tempfile.TemporaryDirectory(prefix="convertr-watcher-demo-") as tmp,
        SimulatorServer(sim) as api,
        VerifyingReceiver(secret, show) as receiver,
    ):
        folder = Path(tmp)
        config = _config(folder, api.url, username, password, receiver.url, secret)
        print(f"simulator {api.url}  receiver {receiver.url}  state {folder / 'state.db'}", flush=True)
        log_file = (folder / "daemon.log").open("w")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "watcher", "run", "-c", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        created: list[int] = []
        try:
            if not _wait(lambda: _baseline_done(folder / "state.db") or daemon.poll() is not None, 30):
                print("the daemon did not finish its baseline in 30 s", file=sys.stderr)
                return 1
            if daemon.poll() is not None:
                print((folder / "daemon.log").read_text()[-2000:], file=sys.stderr)
                return 1
            print(f"daemon ready; adding about {rate:g} leads a second for {duration:g} s", flush=True)
            rng = random.Random(seed)
            ids = list(campaigns)
            end = time.monotonic() + duration
            while time.monotonic() < end:
                created.append(sim.add_lead(rng.choice(ids))["id"])
                time.sleep(rng.expovariate(rate))
            _wait(lambda: all(receiver.lead_ids[i] for i in created), 15)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait()
            log_file.close()
        missing = [i for i in created if not receiver.lead_ids[i]]
        duplicates = sum(n - 1 for n in receiver.ids.values() if n > 1)
        print()
        print(f"leads created in the simulator: {len(created)}")
        print(f"events received:                {sum(receiver.ids.values())} ({len(receiver.ids)} distinct ids)")
        print(f"signatures verified:            {receiver.verified} (rejected {receiver.rejected})")
        print(f"missing:                        {len(missing)}")
        print(f"duplicates:                     {duplicates}")
        print(f"daemon exit status:             {code}")
        if missing:
            print(f"missing lead ids: {missing[:20]}", file=sys.stderr)
        return 0 if not missing and receiver.rejected == 0 else 1


def _baseline_done(state: Path) -> bool:
    import sqlite3

    if not state.exists():
        return False
    try:
        with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("SELECT last_success_at FROM cursors WHERE stream = 'leads.created'").fetchone()
    except sqlite3.Error:
        return False
    return bool(row and row[0])
