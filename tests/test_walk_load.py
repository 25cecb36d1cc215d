"""What a walk costs and how it behaves when the server is unkind: requests per lead, capped page
sizes, answers too large to read, runs of unreadable leads, positions that cannot be accounted
for, a spent request budget, and arrivals that never stop.

In-process against the simulator on loopback (tests.support.rig): the real client, pager, poller
and store, with one fake clock for the server and the daemon, so every step is deterministic and
a budget wait passes at once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from tests.support.daemon import cli
from tests.support.rig import Rig, make_rig
from watcher import poller
from watcher.convertr import ConvertrClient
from watcher.metrics import Metrics
from watcher.poller import CREATED, UPDATED

T0 = datetime(2026, 6, 10, 9, 0, tzinfo=UTC).timestamp()
BACKFILL = "2000-01-01T00:00:00Z"


@pytest.fixture
def rig() -> Iterator[Rig]:
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="walk-")))
        yield make_rig(folder, stack, start=T0, leads=0)


def api_reads(rig: Rig) -> int:
    return sum(1 for r in rig.sim.requests if r.path.startswith("/api/v4/"))


def test_a_backfill_reads_each_page_once_when_nothing_moves(rig: Rig) -> None:
    """10 000 leads in pages of 100: no position check is paid while the set's size stays put."""
    expected = rig.sim.add_leads(10_000)
    rig.advance(5)
    rig.configure(items_per_page=100, start=BACKFILL, updates=False)
    rig.start()
    before = len(rig.sim.requests)
    rig.poll()
    assert sorted(rig.created()) == expected
    # 100 pages, the login and the start-up checks of the server's filter and zone; 202 before.
    assert len(rig.sim.requests) - before <= 105


def test_a_row_leaving_during_a_backfill_is_still_not_skipped(rig: Rig) -> None:
    """The size changes, so the boundary is checked: the row that moved back onto a read page is read."""
    expected = rig.sim.add_leads(1_000)
    rig.advance(5)
    rig.configure(items_per_page=100, start=BACKFILL, updates=False)
    rig.sim.hooks[("created", 3, 100)] = lambda: rig.sim.hide_lead(expected[5])
    rig.poll()
    assert not rig.sim.hooks
    assert sorted(rig.created()) == expected


def test_a_capped_server_with_an_unreadable_first_page_backfills_everything_else(rig: Rig) -> None:
    """A server serving 7 rows when asked for 100, an unreadable lead on the first page, a row leaving
    mid-walk: the walk learns the size, ends, and every other lead is announced once."""
    sim = rig.sim
    leads = sim.add_leads(120)
    sim.faults.max_items_per_page = 7
    sim.poison_lead(leads[2])
    rig.advance(5)
    rig.configure(items_per_page=100, start=BACKFILL, updates=False)
    sim.hooks[("created", 4, 7)] = lambda: sim.hide_lead(leads[0])
    before = api_reads(rig)
    rig.poll()
    assert not sim.hooks, "the row left mid-walk"
    created = rig.created()
    assert sorted(created) == [i for i in leads if i != leads[2]]
    assert set(created.values()) == {1}
    assert [u.lead_id for u in rig.ensure().unreadable()] == [leads[2]]
    assert api_reads(rig) - before < 150  # 18 pages, narrowing one, a few checks: it ends


def _oversized(rig: Rig, leads: int = 40, big: int = 12) -> tuple[list[int], int]:
    ids = rig.sim.add_leads(leads)
    rig.sim.update_lead(ids[big], lead_data={"Notes": "x" * 80_000})
    return ids, ids[big]


def test_an_answer_too_large_splits_the_page_and_isolates_the_lead(rig: Rig) -> None:
    """One lead larger than max_response_bytes: it is recorded as unreadable (status and a metric say
    why) and every other lead, new ones and edits of old ones, keeps flowing."""
    ids, big = _oversized(rig)
    rig.advance(5)
    rig.configure(items_per_page=10, convertr={"max_response_bytes": 65_536}, start=BACKFILL, updates=True)
    poller = rig.start()
    poller.metrics = metrics = Metrics(T0)
    rig.poll()
    assert sorted(rig.created()) == [i for i in ids if i != big]
    entries = rig.ensure().unreadable()  # one per walk that met it
    assert {u.lead_id for u in entries} == {big}
    assert all("max_response_bytes" in (u.error or "") for u in entries)
    assert metrics.registry.get_sample_value("watcher_walk_pages_narrowed_total", {"cause": "too_large"})
    rig.advance(60)
    later = rig.sim.add_leads(3)
    rig.sim.update_lead(ids[3], score=77)
    rig.advance(5)
    rig.poll()
    assert set(later) <= set(rig.created())
    assert [u["data"]["changes"]["score"]["to"] for u in rig.updates(ids[3])] == [77]
    status = cli("status", "-c", str(rig.folder / "config.toml"), "--json")
    assert status.returncode == 0, status.stderr
    assert "max_response_bytes" in status.stdout


def test_a_page_of_unreadable_leads_is_isolated_not_an_outage(rig: Rig) -> None:
    """items_per_page consecutive unreadable leads (one bad import batch): the rows beside them read,
    so they are records, each recorded and retried; the other leads are announced."""
    ids = rig.sim.add_leads(40)
    for lead in ids[10:20]:
        rig.sim.poison_lead(lead)
    rig.advance(5)
    rig.configure(items_per_page=10, start=BACKFILL, updates=False)
    rig.poll()
    assert sorted(rig.created()) == ids[:10] + ids[20:]
    assert sorted(u.lead_id for u in rig.ensure().unreadable()) == ids[10:20]
    for lead in ids[10:20]:
        rig.sim.poison_lead(lead, poisoned=False)
    rig.advance(301)  # the first retry of an unreadable lead
    rig.poll()
    assert sorted(rig.created()) == ids


def test_an_unreadable_lead_that_cannot_be_identified_holds_the_cursor(rig: Rig) -> None:
    """Ours, unreadable, with 6 000 other campaigns' ids between it and its readable neighbour (beyond
    the id search): the cursor stays before it (status says why), so once cured it is announced."""
    sim = rig.sim
    ours, theirs = sim.campaign_ids()[:2]
    first = sim.add_lead(ours)["id"]
    sim.add_leads(6_000, campaign_id=theirs)
    lost = sim.add_lead(ours)["id"]
    sim.poison_lead(lost)
    rig.advance(120)
    last = sim.add_lead(ours)["id"]
    rig.advance(5)
    rig.configure(items_per_page=4, start=BACKFILL, updates=False, campaign_ids=[ours])
    rig.poll()
    assert sorted(rig.created()) == [first, last]
    state = rig.ensure().cursor(CREATED)
    assert state is not None and (state.last_error or "").startswith("cursor held")
    status = cli("status", "-c", str(rig.folder / "config.toml"))
    assert "cursor held" in status.stdout
    sim.poison_lead(lost, poisoned=False)
    rig.advance(60)  # beyond lookback (30 s) of the last lead: only a held cursor still reaches it
    rig.poll()
    assert sorted(rig.created()) == [first, lost, last]


def test_a_spent_budget_is_one_warning_a_metric_and_a_status_line(rig: Rig) -> None:
    """Requests waiting for the rolling window are never silent."""
    rig.sim.add_leads(60)
    rig.advance(5)
    config = rig.configure(items_per_page=10, convertr={"request_budget": 4}, start=BACKFILL, updates=False)
    poller = rig.start()
    waits: list[float] = []
    client = ConvertrClient(config.convertr, clock=rig.clock, on_budget_wait=waits.append)
    poller.client = client
    try:
        with structlog.testing.capture_logs() as logs:
            rig.poll()
    finally:
        rig.loop.run_until_complete(client.aclose())
    assert len(rig.created()) == 60
    assert sum(waits) > 0
    warnings = [e for e in logs if e["event"].startswith("convertr.throttled")]
    assert len(warnings) == 1, warnings
    state = rig.ensure().cursor(CREATED)
    assert state is not None and (state.last_error or "").startswith("throttled")
    assert "throttled" in cli("status", "-c", str(rig.folder / "config.toml")).stdout


def test_a_backfill_holds_no_id_per_lead_it_read(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids a walk read are kept for a lookback window only: a backfill starts none, so it keeps none
    (it held all 100 000 of a large backfill to its end: 14 MB more peak RSS). The sweep that
    follows keeps what it read, and its window finds a lead that became visible late."""
    largest: list[int] = []
    real = poller._remember

    def remember(seen: dict[int, float], *args: object) -> None:
        real(seen, *args)  # type: ignore[arg-type]
        largest.append(len(seen))

    monkeypatch.setattr(poller, "_remember", remember)
    expected: list[int] = []
    for _ in range(100):  # 20 a second: 600 in a lookback of 30 s
        expected += rig.sim.add_leads(20)
        rig.advance(1)
    rig.advance(60)  # older than the lookback: the updated walk's first sweep has none of them to read
    rig.configure(items_per_page=100, start=BACKFILL, updates=True, lookback="30s")
    rig.start()
    rig.poll()
    assert sorted(rig.created()) == expected
    assert max(largest, default=0) == 0
    late = rig.sim.add_lead(created=rig.sim.now() - timedelta(seconds=20), visible=False)["id"]
    fresh = rig.sim.add_leads(3)
    rig.advance(1)
    rig.poll()  # a sweep of the lookback behind the cursor: it keeps what it read there
    # the last 30 s of the backfill behind its cursor and the 3 new leads, not the 2 000 backfilled
    assert 600 <= max(largest) <= 600 + 20 + 3
    rig.sim.reveal_lead(late)
    rig.advance(11)
    rig.poll()  # its count finds a row no walk read
    rig.advance(1)
    rig.poll()  # and this one reads the lookback again
    assert sorted(rig.created()) == sorted([*expected, *fresh, late])
    assert set(rig.created().values()) == {1}


def _steady(rig: Rig, *, lookback: str = "5m", updates: bool = False, page: int = 100) -> None:
    """A running daemon with `lookback` full of leads: 2 000 created over the last four minutes."""
    rig.configure(items_per_page=page, lookback=lookback, updates=updates)
    rig.poll()  # the baseline
    for _ in range(240):
        rig.sim.add_leads(8)
        rig.advance(1)
    rig.poll()
    rig.advance(1)
    rig.poll()


def test_a_poll_reads_what_arrived_not_the_whole_lookback(rig: Rig) -> None:
    """With the lookback full (20 pages), a poll after 5 new leads costs a page or two, not 20."""
    _steady(rig, updates=True)
    rig.sim.add_leads(5)
    rig.advance(1)
    before = api_reads(rig)
    rig.poll()
    assert api_reads(rig) - before <= 4  # one page per walk, and at most a count of each lookback
    rig.advance(1)
    rig.sim.add_leads(5)
    before = api_reads(rig)
    rig.poll()
    assert api_reads(rig) - before <= 4


def test_a_lead_visible_late_behind_the_cursor_is_found_by_the_count(rig: Rig) -> None:
    """Created 20 s before it became visible, after the cursor passed its time: the next count of the
    lookback differs from what the walks read, the next poll reads the lookback again and announces it."""
    _steady(rig)
    late = rig.sim.add_lead(created=rig.sim.now() - timedelta(seconds=20), visible=False)["id"]
    rig.sim.add_leads(3)
    rig.advance(1)
    rig.poll()
    rig.sim.reveal_lead(late)
    rig.advance(11)
    rig.poll()  # its count finds a row no walk read
    rig.advance(1)
    rig.poll()  # and this one reads the lookback again
    assert rig.created()[late] == 1
    assert set(rig.created().values()) == {1}


def test_a_walk_that_chases_the_tail_moves_its_cursor_with_it(rig: Rig) -> None:
    """Leads keep arriving while the updated walk reads them: its cursor ends within the safety lag of
    the server's time at its last page, so the next poll does not read them all again."""
    rig.configure(items_per_page=10, lookback="5m", updates=True)
    rig.poll()
    rig.sim.add_leads(30)

    def more(page: int) -> None:
        rig.advance(20)
        rig.sim.add_leads(10)
        if page < 6:
            rig.sim.hooks[("updated", page + 1, 0)] = lambda: more(page + 1)

    rig.advance(5)
    rig.sim.hooks[("updated", 1, 0)] = lambda: more(1)
    rig.poll()
    assert not rig.sim.hooks
    state = rig.ensure().cursor(UPDATED)
    assert state is not None and state.cursor_ts is not None
    assert rig.sim.now_ts() - state.cursor_ts <= 25


# --- sustained arrivals ---------------------------------------------------------------------------

RATE = 16.0  # leads a second, as in the 10-minute run that fell behind (lookback 5 min, 1 s interval)
PAGE = 100
REQUEST_TIME = 0.05  # seconds of the shared clock each API request takes
KEEP_UP = 30.0  # lead created -> announced, at most, for the run to count as keeping up


class Arrivals:
    """Leads arriving at RATE on the shared clock, however the time passes (requests, budget
    waits, the interval between polls)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.since = rig.clock.now()
        self.owed = 0.0
        self.ids: list[int] = []
        self.on = True

    def catch_up(self) -> None:
        now = self.rig.clock.now()
        if self.on:
            self.owed += (now - self.since) * RATE
            whole = int(self.owed)
            if whole:
                self.ids += self.rig.sim.add_leads(whole)
                self.owed -= whole
        self.since = now

    def tick(self, _endpoint: str, _status: int | None, _seconds: float) -> None:
        self.rig.clock.advance(REQUEST_TIME)
        self.catch_up()


def sustained_run(rig: Rig, seconds: float) -> tuple[dict[int, float], list[int]]:
    """Poll every second under sustained arrivals for `seconds`, then until caught up (bounded):
    each lead's delay from createdTs to detection, and the leads never announced."""
    config = rig.configure(items_per_page=PAGE, lookback="5m", updates=True)
    poller = rig.start()
    arrivals = Arrivals(rig)
    client = ConvertrClient(config.convertr, clock=rig.clock, on_response=arrivals.tick)
    poller.client = client
    try:
        rig.poll()  # the baseline: leads created until it ends existed before it
        baseline = set(arrivals.ids)
        end = rig.clock.now() + seconds
        drain_until = end + 2 * KEEP_UP
        while rig.clock.now() < drain_until:
            started = rig.clock.now()
            arrivals.on = started < end
            rig.poll()
            arrivals.catch_up()
            if rig.clock.now() < started + 1.0:
                rig.clock.advance(started + 1.0 - rig.clock.now())
                arrivals.catch_up()
    finally:
        rig.loop.run_until_complete(client.aclose())
    detected = {
        e["data"]["lead"]["id"]: datetime.fromisoformat(e["timestamp"]).timestamp() for e in rig.events("lead.created")
    }
    delays = {}
    for lead in (i for i in arrivals.ids if i not in baseline):
        if lead in detected:
            created = datetime.fromisoformat(rig.sim.lead(lead)["createdTs"]).timestamp()
            delays[lead] = detected[lead] - created
    return delays, [i for i in arrivals.ids if i not in detected and i not in baseline]


def assert_kept_up(rig: Rig, seconds: float) -> None:
    delays, missing = sustained_run(rig, seconds)
    assert not missing, f"{len(missing)} of {len(delays) + len(missing)} leads never announced"
    assert set(rig.created().values()) == {1}
    worst = max(delays.values())
    assert worst <= KEEP_UP, f"a lead waited {worst:.0f} s (of {len(delays)} leads)"


def test_sustained_arrivals_are_kept_up_with(rig: Rig) -> None:
    """16 leads a second for three simulated minutes, pages of 100, 1 s interval, 5 min lookback,
    updates on: every lead announced once, none later than KEEP_UP."""
    assert_kept_up(rig, 180.0)


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_sustained_arrivals_soak(rig: Rig) -> None:
    """The same for ten simulated minutes, as the run that fell behind (make soak)."""
    assert_kept_up(rig, 600.0)
