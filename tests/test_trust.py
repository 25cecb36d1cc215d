"""Detection a receiver can trust: one test per way the first release lost or invented events.

Each drives the real poller, store and client in-process against the simulator on loopback
(`tests.support.rig`), with a virtual clock that moves only when told.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.rig import HookedSimulator, Rig, make_rig
from watcher.poller import CREATED

SUMMER = datetime(2026, 6, 10, 9, 0, tzinfo=UTC).timestamp()
WINTER = datetime(2026, 12, 10, 9, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    with ExitStack() as stack:

        def make(zone: str = "Europe/London", start: float = SUMMER, leads: int = 12, seed: int = 11) -> Rig:
            return make_rig(tmp_path, stack, zone=zone, start=start, leads=leads, seed=seed)

        yield make


def _new_leads(rig: Rig, n: int, gap: float = 1.0) -> list[int]:
    ids = []
    for _ in range(n):
        rig.advance(gap)
        ids.append(int(rig.sim.add_lead()["id"]))
    return ids


@pytest.mark.parametrize("start", [SUMMER, WINTER], ids=["summer", "winter"])
@pytest.mark.parametrize("zone", ["UTC", "Europe/London", "America/New_York", "Asia/Tokyo", "Australia/Sydney"])
def test_new_leads_arrive_whatever_zone_the_server_compares_in(
    rig: Callable[..., Rig], zone: str, start: float
) -> None:
    """With no timezone configured, every lead created after the baseline is announced once, whichever zone
    the server uses and whichever side of the host's clock it lies, and no older lead is."""
    r = rig(zone=zone, start=start)
    r.configure()
    r.poll()
    expected = _new_leads(r, 5)
    r.advance(5)
    r.poll()
    expected += _new_leads(r, 6, gap=20)
    r.advance(5)
    r.poll()
    assert r.created() == {lead: 1 for lead in expected}
    assert r.poller is not None and r.poller.calibration is not None
    assert "returns it" in r.poller.calibration.checked


def test_a_wrong_configured_zone_warns_and_loses_nothing(rig: Callable[..., Rig]) -> None:
    """A server an hour behind the configured London (UTC in summer) draws a warning; every new lead still arrives."""
    r = rig(zone="UTC")
    r.configure(convertr={"timezone": "Europe/London"})
    r.poll()
    expected = _new_leads(r, 7)
    r.advance(5)
    r.poll()
    assert r.created() == {lead: 1 for lead in expected}
    assert r.poller is not None and r.poller.server.disagreement is not None


def test_switching_updates_on_later_reports_the_next_changes(rig: Callable[..., Rig]) -> None:
    """Leads seen while updates were off are snapshotted when they are switched on, so their next change is reported."""
    r = rig()
    r.configure(updates=False)
    r.poll()
    fresh = _new_leads(r, 3)
    r.advance(5)
    r.poll()
    r.configure(updates=True)
    r.restart()
    r.poll()
    leads = [*fresh, *r.sim.lead_ids()[:3]]
    r.advance(5)
    for lead in leads:
        before = r.sim.lead(lead)["qaResult"]["name"]
        r.sim.update_lead(lead, qaResult="Invalid" if before != "Invalid" else "Valid")
    r.advance(5)
    r.poll()
    assert sorted(e["data"]["lead"]["id"] for e in r.updates()) == sorted(leads)
    assert all("qaResult" in e["data"]["changes"] for e in r.updates())


def test_a_field_added_to_track_is_learnt_then_reported(rig: Callable[..., Rig]) -> None:
    """After `qaResult` joins `track`, its first value is learnt silently and its next change is reported."""
    r = rig()
    r.configure(track=["score"])
    r.poll()
    lead = r.sim.lead_ids()[0]
    r.configure(track=["score", "qaResult"])
    r.restart()
    r.advance(5)
    r.poll()
    assert r.updates() == []
    r.sim.update_lead(lead, qaResult="Invalid" if r.sim.lead(lead)["qaResult"]["name"] != "Invalid" else "Valid")
    r.advance(5)
    r.poll()
    [event] = r.updates()
    assert list(event["data"]["changes"]) == ["qaResult"]


def test_changes_to_leads_from_before_the_baseline_are_reported(rig: Callable[..., Rig]) -> None:
    """Leads that existed before the first run (days old) report their first change with its diff."""
    r = rig(leads=20)
    r.configure()
    r.poll()
    old = r.sim.lead_ids()[:5]
    r.advance(10)
    for lead in old:
        r.sim.update_lead(lead, lead_data={"Job Title": "Chief Watcher"})
    r.advance(5)
    r.poll()
    assert sorted(e["data"]["lead"]["id"] for e in r.updates()) == old
    assert all(e["data"]["changes"]["leadData.Job Title"]["to"] == "Chief Watcher" for e in r.updates())
    assert r.created() == {}


def test_campaign_transition_ids_differ_after_a_backup_restore(rig: Callable[..., Rig]) -> None:
    """A new Active→Paused after restoring a backup gets an id of its own, not the id of the pause before it."""
    r = rig()
    r.configure()
    campaign = int(r.sim.add_campaign()["id"])
    r.poll_campaigns()
    backup = r.backup()
    r.advance(60)
    r.sim.pause_campaign(campaign)
    r.poll_campaigns()
    r.advance(60)
    r.sim.resume_campaign(campaign)
    r.poll_campaigns()
    first = [e["id"] for e in r.events("campaign.status_changed")]
    r.restore(backup)
    r.advance(60)
    r.sim.pause_campaign(campaign)
    r.poll_campaigns()
    [again] = r.events("campaign.status_changed")
    assert again["data"]["to"] == "Paused" and again["id"] not in first


def test_flip_flops_within_one_second_each_get_their_own_id(rig: Callable[..., Rig]) -> None:
    """A→B→A→B→A in one second, and leadData edits that leave updatedTs alone, are each a distinct event."""
    r = rig()
    r.configure()
    r.poll()
    lead = r.sim.lead_ids()[0]
    r.advance(10)
    for qa in ("Invalid", "Valid", "Invalid", "Valid"):
        r.sim.update_lead(lead, qaResult=qa, leadFlag=None)
        r.poll()
    for title in ("A", "B", "A", "B"):
        r.sim.update_lead(lead, touch=False, lead_data={"Job Title": title})
        r.poll()
    events = r.updates(lead)
    changes = [e["data"]["changes"] for e in events]
    assert len({e["id"] for e in events}) == len(events)
    assert [c["leadData.Job Title"]["to"] for c in changes if "leadData.Job Title" in c] == ["A", "B", "A", "B"]
    assert len([c for c in changes if "qaResult" in c]) >= 3  # the first may find Valid already


def test_leads_just_before_the_baseline_are_not_announced(rig: Callable[..., Rig]) -> None:
    """Leads created between baseline − lookback − safety lag and baseline − lookback were there at the
    baseline: no later walk announces them."""
    r = rig(leads=0)
    r.configure(lookback="30s", safety_lag="2s")
    now = r.sim.now_ts()
    for _ in range(5):
        r.sim.add_lead(created=datetime.fromtimestamp(now - 31, UTC))
    r.poll()
    r.advance(10)
    r.poll()
    fresh = _new_leads(r, 2)
    r.advance(5)
    r.poll()
    assert r.created() == {lead: 1 for lead in fresh}


def test_a_row_leaving_mid_walk_skips_no_lead(rig: Callable[..., Rig]) -> None:
    """A lead hidden on an already-read page shifts the next page back a row; the walk notices and reads
    the lead that moved onto the read page, though it is older than the lookback."""
    r = rig(leads=0)
    r.configure(lookback="30s", items_per_page=4)
    r.poll()
    fresh = _new_leads(r, 8, gap=60)
    sim = r.sim
    assert isinstance(sim, HookedSimulator)
    sim.hooks[("created", 1, 4)] = lambda: sim.hide_lead(fresh[1])
    r.advance(5)
    r.poll()
    r.advance(5)
    r.poll()
    assert r.created() == {lead: 1 for lead in fresh}


def test_an_unreadable_lead_is_isolated_and_delivered_once_readable(rig: Callable[..., Rig]) -> None:
    """A lead whose every read answers 500 is skipped and recorded, every other lead flows, and it is
    announced once the server can read it again."""
    r = rig(leads=0)
    r.configure(items_per_page=4)
    r.poll()
    fresh = _new_leads(r, 10)
    r.sim.poison_lead(fresh[2])
    r.advance(5)
    r.poll()
    assert r.created() == {lead: 1 for lead in fresh if lead != fresh[2]}
    assert r.store is not None and [u.lead_id for u in r.store.unreadable(CREATED)] == [fresh[2]]
    later = _new_leads(r, 2)
    r.advance(5)
    r.poll()
    assert set(r.created()) == set(fresh + later) - {fresh[2]}
    r.sim.poison_lead(fresh[2], poisoned=False)
    r.advance(600)
    r.poll()
    assert r.created() == {lead: 1 for lead in fresh + later}
    assert r.store.unreadable() == []


def test_an_unreadable_changed_lead_reports_its_change_once_readable(rig: Callable[..., Rig]) -> None:
    """A changed lead the server cannot serialise holds up no other change, and its own change is
    reported, once, when it can be read again."""
    r = rig()
    r.configure(items_per_page=4)
    r.poll()
    first, second = r.sim.lead_ids()[:2]
    r.advance(10)
    for lead in (first, second):
        r.sim.update_lead(lead, lead_data={"Job Title": "Poisoned"})
    r.sim.poison_lead(first)
    r.advance(5)
    r.poll()
    assert [e["data"]["lead"]["id"] for e in r.updates()] == [second]
    r.sim.poison_lead(first, poisoned=False)
    r.advance(600)
    r.poll()
    r.advance(5)
    r.poll()
    assert sorted(e["data"]["lead"]["id"] for e in r.updates()) == sorted([first, second])
    assert r.store is not None and r.store.unreadable() == []
