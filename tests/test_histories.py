"""Histories that lost or invented events (issue 19), one test each, against the real poller, store
and client in-process with the simulator on loopback (`tests.support.rig`) and a virtual clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.rig import HookedSimulator, Rig, make_rig
from tests.support.schemas import validate_event
from watcher import detect
from watcher.pii import is_personal_field
from watcher.poller import BASELINE, CREATED
from watcher.records import LeadState

SUMMER = datetime(2026, 6, 10, 9, 0, tzinfo=UTC).timestamp()


class Crash(Exception):
    """The process died between reading a page and committing it."""


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    with ExitStack() as stack:

        def make(leads: int = 0, seed: int = 11) -> Rig:
            return make_rig(tmp_path, stack, zone="Europe/London", start=SUMMER, leads=leads, seed=seed)

        yield make


def _new_leads(rig: Rig, n: int, gap: float = 1.0) -> list[int]:
    ids = []
    for _ in range(n):
        rig.advance(gap)
        ids.append(int(rig.sim.add_lead()["id"]))
    return ids


def _flip_qa(rig: Rig, lead: int) -> None:
    rig.sim.update_lead(lead, qaResult="Invalid" if rig.sim.lead(lead)["qaResult"]["name"] != "Invalid" else "Valid")


@pytest.mark.parametrize("walk", ["updated", "recheck"])
def test_a_new_lead_unreadable_when_first_met_is_announced_once_whichever_walk_reads_it(
    rig: Callable[..., Rig], walk: str
) -> None:
    """Cured and read by a change walk (or the recheck walk) before its own retry, past the created walk's
    reach: it is still one lead.created, and the retry adds nothing."""
    r = rig()
    if walk == "recheck":
        r.sim.faults.drop_updated_ts_filter = True
    r.configure(items_per_page=4, lookback="30s", recheck_interval=1, recheck_window="1d")
    r.poll()
    fresh = _new_leads(r, 6)
    poisoned = fresh[2]
    r.sim.poison_lead(poisoned)
    r.advance(5)
    r.poll()
    assert r.store is not None and [u.lead_id for u in r.store.unreadable(CREATED)] == [poisoned]
    r.advance(60)
    later = _new_leads(r, 1)  # moves the created cursor past the unreadable lead's lookback
    r.advance(5)
    r.poll()
    r.sim.poison_lead(poisoned, poisoned=False)
    _flip_qa(r, poisoned)  # so the updated walk reads it
    r.advance(5)
    r.poll()
    r.advance(600)  # the unreadable lead's own retry comes due
    r.poll()
    assert r.created() == {lead: 1 for lead in fresh + later}
    assert r.store.unreadable() == []


def test_a_lead_unreadable_at_the_first_baseline_is_never_announced(rig: Callable[..., Rig]) -> None:
    """A lead that existed at the first run's baseline, unreadable then and cured before its retry, is
    recorded when a later walk reads it, never announced."""
    r = rig()
    r.configure(items_per_page=4, lookback="30s")
    before = _new_leads(r, 6)
    r.sim.poison_lead(before[3])
    r.advance(5)
    r.poll()
    assert r.store is not None and [u.lead_id for u in r.store.unreadable(CREATED)] == [before[3]]
    r.sim.poison_lead(before[3], poisoned=False)
    r.advance(5)  # within the lookback: the next created walk reads it again
    r.poll()
    r.advance(600)
    r.poll()
    fresh = _new_leads(r, 2)
    r.advance(5)
    r.poll()
    assert r.created() == {lead: 1 for lead in fresh}
    assert r.store.leads([before[3]]) and r.store.unreadable() == []


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_a_baseline_resumed_under_another_track_snapshots_the_new_fields(rig: Callable[..., Rig], how: str) -> None:
    """The snapshot baseline stops after two pages; the daemon starts again with `score` added to `track`.
    Leads on the pages read before the stop report their first score change like every other lead."""
    r = rig(leads=24)
    r.configure(items_per_page=4, track=["qaResult"])
    poller = r.start()
    store = r.ensure()
    original = store.commit_page
    done = [0]

    def commit_page(page: Any) -> Any:
        if page.stream == BASELINE:
            if how == "sigkill" and done[0] >= 2:
                raise Crash
            done[0] += 1
        return original(page)

    store.commit_page = commit_page  # type: ignore[method-assign]
    if how == "sigterm":
        poller.should_stop = lambda: done[0] >= 2
    with suppress(Crash):
        r.poll()
    state = store.cursor(BASELINE)
    assert state is not None and state.walk_from is not None, "the baseline was cut short"
    r.configure(items_per_page=4, track=["qaResult", "score"])
    r.restart()
    r.poll()
    r.advance(10)
    leads = r.sim.lead_ids()
    for lead in leads:
        r.sim.update_lead(lead, score=(r.sim.lead(lead).get("score") or 0) + 1)
    r.advance(5)
    r.poll()
    changed = sorted(e["data"]["lead"]["id"] for e in r.updates() if "score" in e["data"]["changes"])
    assert changed == leads


def test_a_campaign_deleted_between_two_pages_of_the_first_poll_invents_no_campaign(rig: Callable[..., Rig]) -> None:
    """Rows shift back under the first campaign walk; the campaign that moved onto the page already read is
    still read, so the next poll does not announce it as new."""
    r = rig()
    r.configure(items_per_page=4)
    for _ in range(8):
        r.sim.add_campaign()
    sim = r.sim
    assert isinstance(sim, HookedSimulator)
    first_page = sim.campaign_ids()[:4]
    sim.hooks[("campaigns", 1, 4)] = lambda: sim.delete_campaign(first_page[1])
    r.poll_campaigns()
    r.advance(60)
    r.poll_campaigns()
    assert r.events("campaign.created") == []
    assert r.store is not None and set(r.store.campaigns()) >= set(sim.campaign_ids())


@pytest.mark.parametrize("how", ["sigterm", "failed page"])
def test_a_campaign_created_while_the_first_campaign_read_is_stopped_is_announced(
    rig: Callable[..., Rig], how: str
) -> None:
    """The first campaign read stops after one page (SIGTERM, or a page the server fails) and is taken up
    again later: a campaign created in between is announced; those that existed when it began are not."""
    r = rig()
    r.configure(items_per_page=4)
    for _ in range(8):
        r.sim.add_campaign()
    existing = set(r.sim.campaign_ids())
    poller = r.start()
    sim = r.sim
    assert isinstance(sim, HookedSimulator)
    if how == "sigterm":
        poller.should_stop = lambda: True
        r.poll_campaigns()
    else:
        sim.hooks[("campaigns", 1, 4)] = lambda: setattr(sim.faults, "error_rate", 1.0)
        with suppress(Exception):
            r.poll_campaigns()
        sim.faults.error_rate = 0.0
    assert r.store is not None and 0 < len(r.store.campaigns()) < len(existing)
    r.restart()
    r.advance(300)
    new = int(sim.add_campaign()["id"])
    r.poll_campaigns()
    assert [e["data"]["campaign"]["id"] for e in r.events("campaign.created")] == [new]
    assert set(r.store.campaigns()) == existing | {new}


def test_repeated_lead_data_names_are_each_compared_and_a_reordering_is_no_change(rig: Callable[..., Rig]) -> None:
    """A lead with two "Job Title" entries: a change to either is reported under a name that tells them
    apart, and serving the entries in another order reports nothing."""
    r = rig(leads=3)
    r.configure(items_per_page=4, track=["leadData"])
    lead = r.sim.lead_ids()[0]
    first = r.sim.add_lead_data(lead, "Job Title", "Analyst")
    second = r.sim.add_lead_data(lead, "Job Title", "Engineer")
    r.poll()
    r.advance(10)
    r.sim.set_lead_data(lead, first, "Chief Analyst")
    r.advance(5)
    r.poll()
    r.advance(10)
    r.sim.set_lead_data(lead, second, "Chief Engineer")
    r.advance(5)
    r.poll()
    r.advance(10)
    r.sim.reverse_lead_data(lead)
    r.sim.update_lead(lead, score=7)  # moves updatedTs, so the updated walk reads the reordered list
    r.advance(5)
    r.poll()
    for event in r.updates(lead):
        validate_event({"type": event["type"], "timestamp": event["timestamp"], "data": event["data"]})
    changes = [e["data"]["changes"] for e in r.updates(lead)]
    assert changes == [
        {"leadData.Job Title": {"from": "Analyst", "to": "Chief Analyst"}},
        {f"leadData#{second}.Job Title": {"from": "Engineer", "to": "Chief Engineer"}},
    ]


def test_repeated_lead_data_entries_given_new_ids_with_their_values_unchanged_are_no_change(
    rig: Callable[..., Rig],
) -> None:
    """A save that replaces a lead's whole leadData collection gives every entry a new id: the entries of
    a repeated name keep their values, so nothing changed, and a later edit is still reported once."""
    r = rig(leads=3)
    r.configure(items_per_page=4, track=["leadData"])
    lead = r.sim.lead_ids()[0]
    r.sim.add_lead_data(lead, "Job Title", "Analyst")
    r.sim.add_lead_data(lead, "Job Title", "Engineer")
    r.poll()
    r.advance(10)
    r.sim.renumber_lead_data(lead)
    r.advance(5)
    r.poll()
    assert r.updates(lead) == []
    r.advance(10)
    entry = next(e for e in r.sim.lead(lead)["leadData"] if e["value"] == "Engineer")
    r.sim.set_lead_data(lead, int(entry["@id"].rpartition("/")[2]), "Chief Engineer")
    r.advance(5)
    r.poll()
    changes = [e["data"]["changes"] for e in r.updates(lead)]
    assert [[(c["from"], c["to"]) for c in change.values()] for change in changes] == [[("Engineer", "Chief Engineer")]]


def _entry(data_id: int | None, name: str, value: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"@type": "LeadData", "name": name, "value": value}
    if data_id is not None:
        entry["@id"] = f"/api/v4/lead-datas/{data_id}"
    return entry


def _walk(tracks: dict[str, tuple[str, ...]]) -> detect.LeadWalk:
    return detect.LeadWalk("leads.updated", 1e9, "2001-09-09T01:46:40.000Z", 1e9, ("leadData",), True, tracks=tracks)


def test_a_snapshot_from_before_repeated_names_were_kept_invents_no_change() -> None:
    """A snapshot written by the release that kept one value per leadData name (the last) is compared on
    every other entry; the entries of a repeated name are learnt, not reported, then compared from then on."""
    track = ("leadData",)
    old_sig = detect.legacy_signature(track)
    tracks = {old_sig: track, detect.track_signature(track): track}
    legacy = {1: LeadState(1, 0.0, "v0", {"leadData.Job Title": "Engineer", "leadData.country": "UK"}, old_sig)}
    lead = {
        "id": 1,
        "updatedTs": "2001-09-09T01:46:40+00:00",
        "leadData": [_entry(7, "Job Title", "Analyst"), _entry(9, "Job Title", "Engineer"), _entry(8, "country", "FR")],
    }
    commit = detect.decide_updated([lead], legacy, _walk(tracks), None, lambda e: ["crm"])
    assert [e.data["changes"] for e, _ in commit.events] == [{"leadData.country": {"from": "UK", "to": "FR"}}]
    [state] = commit.leads
    assert state.track == detect.track_signature(track)
    assert state.snapshot == {
        "leadData.Job Title": "Analyst",
        "leadData#9.Job Title": "Engineer",
        "leadData.country": "FR",
    }


def test_repeated_entries_without_ids_are_compared_whatever_their_order() -> None:
    """Entries without an @id are ranked by value: a reordering is no change, a changed value is one."""
    a = detect.snapshot({"leadData": [_entry(None, "x", "b"), _entry(None, "x", "a")]}, ["leadData"])
    b = detect.snapshot({"leadData": [_entry(None, "x", "a"), _entry(None, "x", "b")]}, ["leadData"])
    c = detect.snapshot({"leadData": [_entry(None, "x", "a"), _entry(None, "x", "c")]}, ["leadData"])
    assert a == b == {"leadData.x": "a", "leadData#2.x": "b"}
    assert detect.diff(a, c) == {"leadData#2.x": {"from": "b", "to": "c"}}
    assert is_personal_field("leadData#2.email") and not is_personal_field("leadData#2.country")


@pytest.mark.parametrize("quiet_edits", [True, False])
def test_an_edit_that_leaves_updated_ts_unmoved_is_reported_by_the_re_read(
    rig: Callable[..., Rig], quiet_edits: bool
) -> None:
    """A leadData write that does not move updatedTs, on a lead last updated long before: with `quiet_edits`
    the re-read of `recheck_window` reports it within `recheck_interval`; without it, nothing can."""
    r = rig(leads=6)
    r.configure(items_per_page=4, quiet_edits=quiet_edits, recheck_window="7d", recheck_interval="5m")
    r.poll()
    lead = r.sim.lead_ids()[0]
    r.advance(120)
    r.sim.update_lead(lead, touch=False, lead_data={"Job Title": "Quiet Achiever"})
    r.advance(5)
    r.poll()
    r.advance(300)
    r.poll()
    changes = [e["data"]["changes"] for e in r.updates(lead)]
    if quiet_edits:
        assert [c["leadData.Job Title"]["to"] for c in changes] == ["Quiet Achiever"]
    else:
        assert changes == []
