"""Histories found by an outside attack on the lead and campaign walks (issue 19, after it was built),
one test each, against the real poller, store and client in-process with the simulator on loopback
(`tests.support.rig`) and a virtual clock. Costs are counted in the simulator's own request log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.rig import Rig, make_rig
from watcher.poller import BASELINE, CREATED

SUMMER = datetime(2026, 6, 10, 9, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    with ExitStack() as stack:

        def make(leads: int = 0, seed: int = 11) -> Rig:
            return make_rig(tmp_path, stack, zone="Europe/London", start=SUMMER, leads=leads, seed=seed)

        yield make


def _settled(r: Rig) -> list[int]:
    """A daemon past its first polls (its lookback re-read once), then six new leads, the third unreadable
    from the start, read by one poll: the unreadable one is identified and put on its slow retry."""
    r.configure(items_per_page=4, lookback="5m")
    r.poll()
    for _ in range(3):
        r.advance(400)
        r.poll()
    fresh = []
    for _ in range(6):
        r.advance(1)
        fresh.append(int(r.sim.add_lead()["id"]))
    r.sim.poison_lead(fresh[2])
    r.advance(5)
    r.poll()
    assert r.store is not None and [u.lead_id for u in r.store.unreadable(CREATED)] == [fresh[2]]
    return fresh


def test_an_identified_unreadable_lead_costs_no_re_read_of_the_lookback(rig: Callable[..., Rig]) -> None:
    """Its time is unknown, so it is not taken at the page's time (which made every count of the lookback
    miss it, and every other poll re-read the whole lookback and isolate the lead again): the polls that
    follow, before its retry is due, never read its page again."""
    r = rig()
    fresh = _settled(r)
    start = len(r.sim.requests)
    polls = 8
    for _ in range(polls):
        r.advance(20)  # 160 s in all: within the lookback, before the lead's first retry (300 s)
        r.poll()
    served = r.sim.requests[start:]
    assert [q for q in served if q.status != 200] == [], "a poll read the unreadable lead's page again"
    # Per walk (created, updated): the new rows, one count of the lookback, one of the unreadable lead.
    assert len(served) <= polls * 2 * 3
    assert r.created() == {lead: 1 for lead in fresh if lead != fresh[2]}


def test_a_late_lead_behind_an_identified_unreadable_one_is_still_found_by_the_count(rig: Callable[..., Rig]) -> None:
    """The count that stands in for a re-read must not take the unreadable lead for the late one: a lead
    that becomes visible late, created within the lookback, is announced."""
    r = rig()
    fresh = _settled(r)
    r.advance(20)
    r.poll()
    late = int(r.sim.add_lead(created=datetime.fromtimestamp(r.clock.now() - 60, UTC), visible=False)["id"])
    r.sim.reveal_lead(late)
    for _ in range(3):
        r.advance(20)
        r.poll()
    assert r.created() == {lead: 1 for lead in [*fresh, late] if lead != fresh[2]}


def test_leads_of_a_campaign_added_to_campaign_ids_report_their_first_change(rig: Callable[..., Rig]) -> None:
    """The snapshot baseline was taken under `campaign_ids = [c1]`; the daemon restarts with c2 added. The
    leads c2 already had (created within `baseline_window`) get snapshots then, so their first change is a
    `lead.updated` like c1's; narrowing the list again takes no new baseline."""
    r = rig()
    c1, c2 = r.sim.campaign_ids()[:2]
    ones = [int(r.sim.add_lead(c1)["id"]) for _ in range(3)]
    twos = [int(r.sim.add_lead(c2)["id"]) for _ in range(3)]
    r.advance(3600)
    r.configure(items_per_page=4, campaign_ids=[c1])
    r.poll()
    r.advance(60)
    r.configure(items_per_page=4, campaign_ids=[c1, c2])
    r.restart()
    r.poll()
    r.advance(60)
    for lead in ones + twos:
        r.sim.update_lead(lead, score=(r.sim.lead(lead).get("score") or 0) + 1)
    r.advance(5)
    r.poll()
    changed = sorted(e["data"]["lead"]["id"] for e in r.updates() if "score" in e["data"]["changes"])
    assert changed == sorted(ones + twos)
    assert r.created() == {}
    store = r.ensure()
    mark = store.cursor(BASELINE)
    r.configure(items_per_page=4, campaign_ids=[c2])
    r.restart()
    r.advance(60)
    r.poll()
    again = r.ensure().cursor(BASELINE)
    assert mark is not None and again is not None and again.last_success_at == mark.last_success_at


def test_a_baseline_resumed_with_larger_pages_snapshots_every_lead(rig: Callable[..., Rig]) -> None:
    """The snapshot baseline stops (SIGTERM) after five pages of 4; the daemon starts again with pages of
    10. The page it resumes from is past the set's end at the new size: it steps back to the rows not read
    yet instead of taking the empty page for the end, so every lead reports its first change."""
    r = rig(leads=30)
    r.configure(items_per_page=4, track=["score"])
    poller = r.start()
    store = r.ensure()
    original = store.commit_page
    pages = [0]

    def commit_page(page: Any) -> Any:
        if page.stream == BASELINE:
            pages[0] += 1
        return original(page)

    store.commit_page = commit_page  # type: ignore[method-assign]
    poller.should_stop = lambda: pages[0] >= 5
    r.poll()
    state = store.cursor(BASELINE)
    assert state is not None and state.walk_from is not None and state.progress == 5, "the baseline was cut short"
    r.configure(items_per_page=10, track=["score"])
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


def test_a_lead_stamped_in_the_future_does_not_delay_the_leads_after_it(rig: Callable[..., Rig]) -> None:
    """A lead whose createdTs is a day ahead (an import's own dates) is not taken for how far the walks
    read: each lead created after it is announced by the poll that follows it, not one poll later."""
    r = rig()
    r.configure(items_per_page=4, lookback="10m", updates=False)
    r.poll()
    for _ in range(3):
        r.advance(700)
        r.poll()
    ahead = int(r.sim.add_lead(created=datetime.fromtimestamp(r.clock.now() + 86400, UTC))["id"])
    r.advance(5)
    r.poll()
    assert r.created()[ahead] == 1
    late = []
    for _ in range(6):
        r.advance(20)
        lead = int(r.sim.add_lead()["id"])
        r.advance(5)
        r.poll()
        if r.created()[lead] != 1:
            late.append(lead)
    assert late == []


def test_an_unreadable_lead_that_cannot_be_identified_holds_the_cursor_until_it_reads(
    rig: Callable[..., Rig],
) -> None:
    """With `campaign_ids`, an unreadable lead of ours sits between two runs of 5 100 other campaigns'
    leads, so its id cannot be searched for. The cursor holds before it poll after poll (not only in the
    poll that met it: the next poll's walk, starting after it, moved the cursor past it, and once it left
    the lookback it was lost), the vain search is not repeated by every poll, and once it reads, long
    after the lookback, it is announced."""
    r = rig()
    ours, theirs = r.sim.campaign_ids()[:2]
    r.configure(items_per_page=10, lookback="2m", campaign_ids=[ours], updates=False)
    r.poll()
    r.advance(200)
    r.poll()
    r.advance(1)
    before = int(r.sim.add_lead(ours)["id"])
    r.sim.add_leads(5100, theirs)
    r.advance(1)
    unreadable = int(r.sim.add_lead(ours)["id"])
    r.sim.poison_lead(unreadable)
    r.sim.add_leads(5100, theirs)
    r.advance(1)
    after = int(r.sim.add_lead(ours)["id"])
    r.advance(5)
    r.poll()
    later = []
    for _ in range(12):  # three minutes: past the lookback
        start = len(r.sim.requests)
        for _ in range(3):
            r.advance(5)
            later.append(int(r.sim.add_lead(ours)["id"]))
        r.poll()
        assert len(r.sim.requests) - start < 50, "a poll searched for the unidentifiable lead again"
    r.sim.poison_lead(unreadable, poisoned=False)
    for _ in range(3):
        r.advance(30)
        r.poll()
    assert r.created() == {lead: 1 for lead in [before, unreadable, after, *later]}
