"""End to end over real sockets: simulator → `convertr-watcher run` in a subprocess → receiver."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import serving
from tests.support.daemon import WEBHOOK_KEY, Daemon, cli, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver
from watcher.simulator import Simulator, SimulatorServer


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=7, campaigns=3, leads=25) as pair:
        yield pair


def _lead_ids(receiver: Receiver) -> Counter[int]:
    return Counter(
        e["data"]["lead"]["id"] for e in receiver.verified_events(WEBHOOK_KEY) if e["type"] == "lead.created"
    )


def _campaign(sim: Simulator) -> int:
    return sim.campaign_ids()[0]


def test_new_leads_arrive_once_and_verify(tmp_path: Path, sim, receiver: Receiver) -> None:
    """Every lead created after start arrives exactly once as a verified lead.created; nothing before it does."""
    simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], convertr={"items_per_page": 5})
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        new = [simulator.add_lead(_campaign(simulator))["id"] for _ in range(12)]
        new += simulator.add_leads(11, _campaign(simulator))  # one second, spread over three pages
        wait_until(lambda: set(_lead_ids(receiver)) >= set(new), 30, "every new lead")
        daemon.wait_polls(2)
        assert daemon.stop() == 0
    counts = _lead_ids(receiver)
    assert set(counts) == set(new), "only leads created after start"
    assert all(n == 1 for n in counts.values())
    assert len(set(receiver.event_ids())) == len(receiver.event_ids())


def test_baseline_sends_nothing_for_existing_leads(tmp_path: Path, sim, receiver: Receiver) -> None:
    """The first run with start = "now" records what exists and sends nothing for it."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)])
    result = cli("once", "-c", str(config))
    assert result.returncode == 0, result.stderr
    result = cli("once", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert receiver.requests == []


def test_backfill_from_start_time_in_id_order(tmp_path: Path, sim, receiver: Receiver) -> None:
    """An RFC 3339 start emits lead.created for every lead created since then, in id order."""
    simulator, server = sim
    start = simulator.now().isoformat()
    simulator.advance(5)
    ids = simulator.add_leads(30, _campaign(simulator))
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url, concurrency=1)],
        convertr={"items_per_page": 7},
        leads={"start": start},
    )
    result = cli("once", "-c", str(config))
    assert result.returncode == 0, result.stderr
    got = [e["data"]["lead"]["id"] for e in receiver.verified_events(WEBHOOK_KEY)]
    assert got == ids


def test_restart_mid_stream_loses_nothing(tmp_path: Path, sim, receiver: Receiver) -> None:
    """SIGTERM while leads stream in, then a restart: nothing missing, any resend carries the same id."""
    simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], convertr={"items_per_page": 3})
    campaign = _campaign(simulator)
    created: list[int] = []
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        for _ in range(3):
            created += simulator.add_leads(4, campaign)
            daemon.wait_polls(1)
        created += simulator.add_leads(5, campaign)
        assert daemon.stop(signal.SIGTERM) == 0
    created += simulator.add_leads(5, campaign)  # while it is down
    with Daemon(config) as daemon:
        wait_until(lambda: set(_lead_ids(receiver)) >= set(created), 30, "every lead after the restart")
        assert daemon.stop() == 0
    ids_by_lead: dict[int, set[str]] = {}
    for request in receiver.requests:
        body = request.json()
        ids_by_lead.setdefault(body["data"]["lead"]["id"], set()).add(request.headers["webhook-id"])
    assert set(ids_by_lead) == set(created)
    assert all(len(ids) == 1 for ids in ids_by_lead.values()), "a resend must carry the same webhook-id"


def test_receiver_down_then_up(tmp_path: Path, sim, receiver: Receiver) -> None:
    """While the receiver answers 503 everything stays queued; afterwards all of it arrives."""
    simulator, server = sim
    receiver.respond(503)
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url, retry_schedule=["1s"] * 8)],
    )
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        ids = simulator.add_leads(6, _campaign(simulator))
        receiver.wait_for(lambda reqs: len({r.headers.get("webhook-id") for r in reqs}) >= 6, 20, "six failing ids")
        receiver.respond(204)
        wait_until(
            lambda: {r.json()["data"]["lead"]["id"] for r in receiver.requests if r.status == 204} >= set(ids),
            30,
            "every queued event after recovery",
        )
        assert daemon.stop() == 0
