"""Campaign status transitions end to end: `convertr-watcher once` against the simulator on a virtual clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import PASSWORD, USERNAME, WEBHOOK_KEY, cli, webhook_sink, write_config
from tests.support.receiver import Receiver
from tests.support.schemas import validate_event
from watcher import detect
from watcher.clock import FakeClock
from watcher.simulator import Simulator, SimulatorServer

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


class Campaigns:
    """A simulator whose clock moves only when told, a verifying receiver, and `once` runs of the campaigns stream."""

    def __init__(self, folder: Path, sim: Simulator, server: SimulatorServer, receiver: Receiver) -> None:
        self.sim = sim
        self.receiver = receiver
        self.config = write_config(
            folder,
            server.url,
            [webhook_sink(receiver.url)],
            convertr={"items_per_page": 3},  # several pages of campaigns
            leads={"enabled": False},
            campaigns={"enabled": True},
        )

    def once(self) -> None:
        result = cli("once", "-c", str(self.config))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def events(self) -> list[dict[str, Any]]:
        """Every delivered body, signature-verified and schema-validated, in arrival order."""
        out = self.receiver.verified_events(WEBHOOK_KEY)
        for body in out:
            validate_event(body)
        return list(out)

    def transitions(self) -> list[tuple[int, str, str]]:
        return [
            (e["data"]["campaign"]["id"], e["data"]["from"], e["data"]["to"])
            for e in self.events()
            if e["type"] == "campaign.status_changed"
        ]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Campaigns]:
    sim = Simulator(seed=21, username=USERNAME, password=PASSWORD, clock=FakeClock(T0.timestamp()))
    sim.seed_data(campaigns=7, leads=10)  # every planned state: active, ending, upcoming, paused, setup, ended
    with SimulatorServer(sim) as server, Receiver() as receiver:
        yield Campaigns(tmp_path, sim, server, receiver)


def _active(sim: Simulator) -> int:
    return next(c for c in sim.campaign_ids() if sim.campaign(c)["status"] == "Active")


def test_baseline_sends_nothing(world: Campaigns) -> None:
    """The first poll records every campaign in whatever state without sending anything; a second poll neither."""
    assert len({world.sim.campaign(c)["status"] for c in world.sim.campaign_ids()}) >= 4
    world.once()
    world.sim.advance(60)
    world.once()
    assert world.receiver.requests == []


def test_pause_then_resume_over_three_polls_gives_two_events(world: Campaigns) -> None:
    """Active→Paused then Paused→Active, each seen by its own poll, are two events with two ids."""
    campaign = _active(world.sim)
    world.once()
    world.sim.advance(30)
    world.sim.pause_campaign(campaign)
    world.once()
    world.sim.advance(30)
    world.sim.resume_campaign(campaign)
    world.once()
    world.sim.advance(30)
    world.once()
    assert world.transitions() == [(campaign, "Active", "Paused"), (campaign, "Paused", "Active")]
    events = world.events()
    assert [e["data"]["campaign"]["status"] for e in events] == ["Paused", "Active"]
    paused, resumed = (e["data"]["campaign"] for e in events)
    first = detect.campaign_status_changed(paused, "Active", "Paused", None, "t").id
    assert [r.headers["webhook-id"] for r in world.receiver.requests] == [
        first,
        detect.campaign_status_changed(resumed, "Paused", "Active", first, "t").id,  # chained on the first
    ]


def test_pause_and_resume_between_two_polls_is_invisible(world: Campaigns) -> None:
    """A→B→A between two polls looks like nothing happened (a documented limit of polling)."""
    campaign = _active(world.sim)
    world.once()
    world.sim.pause_campaign(campaign)
    world.sim.advance(30)
    world.sim.resume_campaign(campaign)
    world.once()
    assert world.receiver.requests == []


def test_dates_passing_change_status_without_a_write(world: Campaigns) -> None:
    """An end date and a start date passing move Active→Ended and Inactive→Active though nothing was written."""
    sim = world.sim
    now = sim.now_ts()
    ending = sim.add_campaign(endTs=now + 100)["id"]
    starting = sim.add_campaign(startTs=now + 100, endTs=now + 90 * 86400)["id"]
    assert (sim.campaign(ending)["status"], sim.campaign(starting)["status"]) == ("Active", "Inactive")
    written = {c: sim.campaign(c)["updatedTs"] for c in (ending, starting)}
    world.once()
    sim.advance(50)
    world.once()  # nothing yet
    sim.advance(100)
    assert {c: sim.campaign(c)["updatedTs"] for c in (ending, starting)} == written
    world.once()
    assert sorted(world.transitions()) == sorted([(ending, "Active", "Ended"), (starting, "Inactive", "Active")])


def test_allocation_met_ends_a_campaign(world: Campaigns) -> None:
    """The valid lead that meets a capped campaign's allocation turns it Active→Ended at the next poll."""
    sim = world.sim
    campaign = sim.add_campaign(leadsRequired=3, uncapped=False)["id"]
    world.once()
    for _ in range(2):
        sim.add_lead(campaign, qaResult="Valid")
    sim.add_lead(campaign, qaResult="Invalid")
    world.once()
    assert world.transitions() == []
    sim.advance(10)
    sim.add_lead(campaign, qaResult="Valid")
    world.once()
    assert world.transitions() == [(campaign, "Active", "Ended")]
    assert world.events()[0]["data"]["campaign"]["statistics"]["validLeads"] == 3


def test_new_campaign_is_announced_without_its_credentials(world: Campaigns) -> None:
    """A campaign first seen after the baseline gives one campaign.created, without apiKey or Facebook token."""
    sim = world.sim
    world.once()
    sim.advance(10)
    campaign = sim.add_campaign(facebookSystemUserAccessToken="EAAB-fake-token")
    world.once()
    sim.advance(10)
    sim.pause_campaign(campaign["id"])
    world.once()
    events = world.events()
    assert [e["type"] for e in events] == ["campaign.created", "campaign.status_changed"]
    created = events[0]["data"]["campaign"]
    assert created["id"] == campaign["id"] and created["status"] == "Active"
    assert "apiKey" not in created and "facebookSystemUserAccessToken" not in created
    assert campaign["apiKey"] not in world.receiver.requests[0].body.decode()
    assert world.transitions() == [(campaign["id"], "Active", "Paused")]
