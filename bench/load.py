"""Sustained arrivals against the real poller: requests per poll, and the highest rate kept up with.

In-process on one fake clock shared by the simulator and the daemon: every API request takes
REQUEST_TIME of it, a budget wait sleeps it, and leads arrive at the given rate however it passes.
So ten minutes of load take seconds, and the figures do not depend on this machine's speed.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from watcher.clock import FakeClock
from watcher.config import load_config
from watcher.convertr import ConvertrClient
from watcher.events import loads
from watcher.poller import Poller
from watcher.simulator import Simulator, SimulatorServer
from watcher.state.store import Store

USERNAME, PASSWORD = "load@example.com", "load-password"
START = 1_781_082_000.0  # 2026-06-10 09:00 UTC
REQUEST_TIME = 0.05
LOOKBACK = "5m"


@dataclass
class Run:
    polls: int
    requests: int
    arrived: int
    missing: int
    worst_delay: float

    @property
    def requests_per_poll(self) -> float:
        return self.requests / max(1, self.polls)


def _config(folder: Path, url: str, page: int, interval: float, budget: int) -> Path:
    path = folder / "load.toml"
    path.write_text(
        f"""
[convertr]
base_url = "{url}"
username = "{USERNAME}"
password = "{PASSWORD}"
items_per_page = {page}
request_budget = {budget}
[state]
path = "state.db"
[leads]
interval = {interval}
lookback = "{LOOKBACK}"
updates = true
[campaigns]
enabled = false
[[sinks]]
name = "kept"
type = "webhook"
url = "http://127.0.0.1:9/"
secret = "whsec_{"A" * 32}"
"""
    )
    path.chmod(0o600)
    return path


def sustained(rate: float, page: int, interval: float, seconds: float, budget: int = 2000) -> Run:
    """Leads at `rate` a second for `seconds`, a leads poll every `interval` (or at once after one
    that overran), then polls until `2 × interval + 30 s` after the arrivals stop."""
    clock = FakeClock(START)
    sim = Simulator(seed=7, username=USERNAME, password=PASSWORD, clock=clock)
    sim.seed_data(campaigns=2, leads=0)
    loop = asyncio.new_event_loop()
    arrived: list[int] = []
    owed = [0.0, clock.now()]
    on = [True]

    def catch_up() -> None:
        now = clock.now()
        if on[0]:
            owed[0] += (now - owed[1]) * rate
            whole = int(owed[0])
            if whole:
                arrived.extend(sim.add_leads(whole))
                owed[0] -= whole
        owed[1] = now

    def tick(_endpoint: str, _status: int | None, _seconds: float) -> None:
        clock.advance(REQUEST_TIME)
        catch_up()

    with tempfile.TemporaryDirectory() as tmp, SimulatorServer(sim) as server:
        config = load_config(_config(Path(tmp), server.url, page, interval, budget))
        store = Store.open(config.state.path)
        client = ConvertrClient(config.convertr, clock=clock, on_response=tick)
        poller = Poller(config, client, store, clock)
        try:
            loop.run_until_complete(poller.poll_leads())  # the baseline
            baseline = set(arrived)
            end = clock.now() + seconds
            polls = 0
            requests = client.request_count
            while clock.now() < end + 2 * interval + 30:
                started = clock.now()
                on[0] = started < end
                loop.run_until_complete(poller.poll_leads())
                polls += 1
                catch_up()
                if clock.now() < started + interval:
                    clock.advance(started + interval - clock.now())
                    catch_up()
            requests = client.request_count - requests
            detected = {}
            for row in store.events():
                body = loads(row["payload"])
                if row["type"] == "lead.created":
                    detected[body["data"]["lead"]["id"]] = datetime.fromisoformat(body["timestamp"]).timestamp()
            delays = [
                detected[i] - datetime.fromisoformat(sim.lead(i)["createdTs"]).timestamp()
                for i in arrived
                if i in detected
            ]
            missing = sum(1 for i in arrived if i not in detected and i not in baseline)
        finally:
            loop.run_until_complete(client.aclose())
            store.close()
            loop.close()
    return Run(polls, requests, len(arrived) - len(baseline), missing, max(delays, default=0.0))


def kept_up(run: Run, interval: float) -> bool:
    return run.missing == 0 and run.worst_delay <= 2 * interval + 30


def highest_rate(page: int, interval: float, seconds: float, rates: tuple[float, ...]) -> float:
    """The highest of `rates` (ascending) kept up with; it stops at the first that is not."""
    best = 0.0
    for rate in rates:
        if not kept_up(sustained(rate, page, interval, seconds), interval):
            break
        best = rate
    return best


def steady_requests(
    rates: tuple[float, ...], page: int = 100, interval: float = 1.0, seconds: float = 120
) -> dict[float, float]:
    """Requests per leads poll (created and updated walks) in steady state, by arrival rate."""
    return {rate: sustained(rate, page, interval, seconds).requests_per_poll for rate in rates}
