"""A Slack sink end to end: simulator → `convertr-watcher run` → a fake Slack incoming webhook on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import serving
from tests.support.daemon import Daemon, cli, wait_until, write_config
from tests.support.receiver import FakeSlack, Reply
from watcher.simulator import Simulator, SimulatorServer
from watcher.sinks.slack import escape


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=5, campaigns=2, leads=10) as pair:
        yield pair


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


def slack_sink(url: str, **overrides: Any) -> dict[str, Any]:
    return {"name": "team", "type": "slack", "url": url, "retry_schedule": ["1s"], **overrides}


def delivered(daemon: Daemon) -> int:
    return daemon.read(lambda store: store.sink_state("team").delivered, 0)


def detected(daemon: Daemon) -> list[tuple[str, str]]:
    return [(e["id"], e["type"]) for e in daemon.read(lambda store: store.events(), [])]


def disabled(daemon: Daemon) -> bool:
    return daemon.read(lambda store: store.sink_disabled("team"), False)


def status(config: Path) -> dict[str, Any]:
    result = cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    [team] = [s for s in json.loads(result.stdout)["sinks"] if s["sink"] == "team"]
    assert isinstance(team, dict)
    return team


def within_limits(message: dict[str, Any]) -> bool:
    """Slack's Block Kit limits: 50 blocks, 150-char header, 3000-char sections, 10 fields of 2000."""
    assert isinstance(message["text"], str) and message["text"]
    blocks = message["blocks"]
    assert 1 <= len(blocks) <= 50 and blocks[0]["type"] == "header"
    for block in blocks:
        if block["type"] == "header":
            assert block["text"]["type"] == "plain_text" and len(block["text"]["text"]) <= 150
        elif block["type"] == "section":
            assert "text" in block or "fields" in block
            assert len(block.get("text", {}).get("text", "")) <= 3000
            assert len(block.get("fields", [])) <= 10
            assert all(len(f["text"]) <= 2000 for f in block.get("fields", []))
        else:
            assert block["type"] == "context" and len(block["elements"]) <= 10
    return True


def personal(simulator: Simulator, lead_id: int) -> list[str]:
    doc = simulator.lead(lead_id)
    values = [doc["email"], doc["telephone"], f"{doc['firstName']} {doc['lastName']}", doc["postcode"], doc["ip"]]
    return [v for v in values if isinstance(v, str) and v.strip()]


def test_messages_are_paced_a_burst_is_a_digest_and_nothing_personal_leaks(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], slack: FakeSlack
) -> None:
    """One message per event at most once a second, a digest for a burst, Block Kit within limits, no personal data."""
    simulator, server = sim
    config = write_config(tmp_path, server.url, [slack_sink(slack.url)], leads={"updates": True})
    campaign = simulator.campaign_ids()[0]
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        lead = simulator.add_lead(campaign)["id"]
        slack.wait_for_count(1, 15)
        simulator.update_lead(lead, email="changed.person@hidden.example", score=1234)
        slack.wait_for_count(2, 15)
        burst = simulator.add_leads(30, campaign)
        wait_until(lambda: delivered(daemon) == 32, 20, "every event delivered")
        assert daemon.stop() == 0
    messages = slack.messages()
    times = slack.arrival_times()
    assert all(b - a >= 0.9 for a, b in pairwise(times)), "at most one message a second"
    assert all(within_limits(m) for m in messages)
    created_id, updated_id = (eid for eid, _type in detected(daemon)[:2])

    first, second, *rest = messages
    assert first["blocks"][0]["text"]["text"] == f"New lead {lead}"
    assert f"*Lead*\n{lead}" in [f["text"] for f in first["blocks"][1]["fields"]]
    assert any(f["text"].startswith("*Campaign*") and str(campaign) in f["text"] for f in first["blocks"][1]["fields"])
    assert (
        created_id in first["blocks"][-1]["elements"][0]["text"] and "UTC" in first["blocks"][-1]["elements"][0]["text"]
    )
    assert second["blocks"][0]["text"]["text"] == f"Lead {lead} updated: 2 fields changed"
    assert updated_id in json.dumps(second)
    assert "1234" in json.dumps(second), "non-personal changes are shown from → to"

    assert 1 <= len(rest) <= 4, "thirty leads at once are a digest or two, not thirty messages"
    assert any(m["text"].split(" ")[0].isdigit() and "Convertr change" in m["text"] for m in rest)
    listed = json.dumps(rest)
    assert sum(int(m["text"].split(" ")[0]) for m in rest) == len(burst), "the digests count every event"
    assert sum(f"New lead {i}" in listed for i in burst) >= 20, "and list a sample of them"
    everything = json.dumps(messages, ensure_ascii=False)
    assert "changed.person@hidden.example" not in everything
    for lead_id in [lead, *burst]:
        assert not [v for v in personal(simulator, lead_id) if v in everything], "personal data in a Slack message"


def test_a_lead_message_names_its_campaign(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], slack: FakeSlack
) -> None:
    """A lead carries only its campaign's IRI; the message names the campaign from the watcher's own records."""
    simulator, server = sim
    sink = slack_sink(slack.url, events=["lead.created"])
    config = write_config(tmp_path, server.url, [sink], campaigns={"enabled": True, "interval": 1})
    campaign = simulator.campaign_ids()[0]
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        daemon.wait_polls(1, "campaigns")
        lead = simulator.add_lead(campaign)["id"]
        slack.wait_for_count(1, 15)
        assert daemon.stop() == 0
    [message] = slack.messages()
    named = f"{escape(simulator.campaign(campaign)['name'])} ({campaign})"
    assert f"*Campaign*\n{named}" in [f["text"] for f in message["blocks"][1]["fields"]]
    assert message["text"] == f"lead.created: New lead {lead} in campaign {named}"


def test_slack_429_retry_after_is_honoured(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], slack: FakeSlack
) -> None:
    """A 429 with Retry-After: 2 keeps the next message away for at least two seconds."""
    simulator, server = sim
    slack.respond_sequence([Reply(429, b"rate_limited", {"retry-after": "2", "content-type": "text/plain"})])
    config = write_config(tmp_path, server.url, [slack_sink(slack.url, retry_schedule=["250ms"] * 4)])
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        simulator.add_leads(1, simulator.campaign_ids()[0])
        first, second = slack.wait_for(lambda reqs: len(reqs) >= 2 and reqs[1].status is not None, 15)[:2]
        assert daemon.stop() == 0
    assert (first.status, second.status) == (429, 200)
    assert second.received_at - first.received_at >= 2.0
    assert first.json() == second.json()


def test_channel_not_found_stops_the_sink_and_keeps_its_events(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], slack: FakeSlack
) -> None:
    """A 404 channel_not_found disables the sink (status shows it), keeps events pending, and replay resumes it."""
    simulator, server = sim
    slack.fail_with("channel_not_found", 404)
    config = write_config(tmp_path, server.url, [slack_sink(slack.url)])
    campaign = simulator.campaign_ids()[0]
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        ids = simulator.add_leads(1, campaign)
        slack.wait_for(lambda reqs: len(reqs) == 1 and reqs[0].status == 404, 15, "the refusal")
        wait_until(lambda: disabled(daemon), 10, "sink disabled")
        ids += simulator.add_leads(3, campaign)
        wait_until(lambda: len(detected(daemon)) == 4, 15, "later leads detected")
        daemon.wait_polls(1)
        state = status(config)
        assert "channel_not_found" in state["disabled_reason"]
        assert (state["pending"], state["dead"], state["delivered"]) == (4, 0, 0)
        assert len(slack.requests) == 1, "no more messages to a refused hook"

        slack.respond(200, b"ok")
        assert cli("replay", "-c", str(config), "--sink", "team").returncode == 0
        wait_until(lambda: delivered(daemon) == 4, 15, "the backlog after replay")
        assert daemon.stop() == 0
    [refused, digest] = slack.messages()
    assert refused["blocks"][0]["text"]["text"] == f"New lead {ids[0]}"
    assert digest["text"].startswith("4 Convertr changes"), "the backlog goes out as one digest"
    assert all(f"New lead {i}" in json.dumps(digest) for i in ids)
    assert status(config)["disabled"] is False
