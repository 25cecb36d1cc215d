"""Lead detection end to end over the simulator on loopback: ties, late rows, writes during a walk,
daylight saving, lead updates, SIGKILL mid-walk, and backfill memory and progress.

Most tests drive `convertr-watcher once` in a subprocess against a simulator whose virtual clock
stands still until the test moves it, so every step is deterministic; only the recheck and crash
tests need the `run` daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import random
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import PASSWORD, USERNAME, WEBHOOK_KEY, Daemon, cli, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver
from tests.support.rig import HookedSimulator
from tests.support.schemas import validate_event
from tests.support.state import reading
from watcher import detect
from watcher.clock import FakeClock, SystemClock
from watcher.config import DEFAULT_TRACK, load_config
from watcher.convertr import ConvertrClient
from watcher.events import event_id
from watcher.poller import Poller
from watcher.simulator import Simulator, SimulatorServer
from watcher.state.store import Store

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
Event = dict[str, Any]


class World:
    """A simulator on a virtual clock that moves only when told, a verifying receiver, and `once` runs."""

    def __init__(self, folder: Path, sim: HookedSimulator, server: SimulatorServer, receiver: Receiver) -> None:
        self.folder = folder
        self.sim = sim
        self.server = server
        self.receiver = receiver
        self.config: Path | None = None

    def configure(self, *, items_per_page: int = 4, **leads: Any) -> Path:
        self.config = write_config(
            self.folder,
            self.server.url,
            [webhook_sink(self.receiver.url)],
            convertr={"items_per_page": items_per_page},
            leads=leads,
        )
        return self.config

    def once(self) -> str:
        assert self.config is not None
        result = cli("once", "-c", str(self.config))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    def advance(self, seconds: float) -> None:
        self.sim.advance(seconds)

    def at(self, when: datetime) -> None:
        self.sim.advance(when.timestamp() - self.sim.now_ts())

    def events(self, type_: str | None = None) -> list[Event]:
        """Every delivered body, signature-verified and schema-validated, in arrival order."""
        out = []
        for body in self.receiver.verified_events(WEBHOOK_KEY):
            validate_event(body)
            if type_ is None or body["type"] == type_:
                out.append(body)
        return out

    def created_ids(self) -> Counter[int]:
        return Counter(e["data"]["lead"]["id"] for e in self.events("lead.created"))

    def updates(self) -> list[Event]:
        return self.events("lead.updated")


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    with ExitStack() as stack:

        def make(start: datetime = T0, seed: int = 11, seeded_leads: int = 20) -> World:
            sim = HookedSimulator(seed=seed, username=USERNAME, password=PASSWORD, clock=FakeClock(start.timestamp()))
            sim.seed_data(campaigns=3, leads=seeded_leads)
            server = stack.enter_context(SimulatorServer(sim))
            receiver = stack.enter_context(Receiver())
            return World(tmp_path, sim, server, receiver)

        yield make


def assert_exactly_once(world: World, expected: list[int]) -> None:
    counts = world.created_ids()
    missing, spurious = set(expected) - set(counts), set(counts) - set(expected)
    assert not missing and not spurious, f"missing {missing}, spurious {spurious}"
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n > 1}
    ids = world.receiver.event_ids()
    assert len(ids) == len(set(ids)), "an event was delivered twice"


def assert_histories_replay(world: World, lead_ids: list[int]) -> None:
    """Each lead's lead.created then lead.updated events replay, change by change, to its current tracked fields."""
    by_lead: dict[int, list[Event]] = defaultdict(list)
    for event in world.events():
        if event["type"].startswith("lead."):
            by_lead[event["data"]["lead"]["id"]].append(event)
    for lead_id in lead_ids:
        history = by_lead[lead_id]
        assert [e["type"] for e in history[:1]] == ["lead.created"], f"lead {lead_id}: {history}"
        state = detect.snapshot(history[0]["data"]["lead"], DEFAULT_TRACK)
        for event in history[1:]:
            assert event["type"] == "lead.updated"
            assert event["data"]["changes"], "an update with no changes"
            for field, change in event["data"]["changes"].items():
                assert change["from"] != change["to"], (lead_id, field, change)
                assert state.get(field) == change["from"], (lead_id, field, change, state.get(field))
                state[field] = change["to"]
            assert detect.snapshot(event["data"]["lead"], DEFAULT_TRACK) == state
        assert state == detect.snapshot(world.sim.lead(lead_id), DEFAULT_TRACK), f"lead {lead_id} ends out of date"


# --- adversarial timing ------------------------------------------------------------------------


def test_same_second_leads_across_page_boundaries(make_world: Callable[..., World]) -> None:
    """Leads sharing one second, split over pages and arriving after the walk in that second, each arrive once."""
    world = make_world()
    world.configure(items_per_page=4, lookback="0s")  # no overlap: the signpost alone must keep the ties
    world.once()
    world.advance(5)
    expected = world.sim.add_leads(11)
    world.once()
    expected += world.sim.add_leads(6)  # the same second as the walk that just ended
    world.once()
    world.advance(1)
    expected += world.sim.add_leads(9)
    world.once()
    world.advance(30)
    world.once()
    assert_exactly_once(world, expected)


def test_late_visible_lead_with_earlier_created_ts(make_world: Callable[..., World]) -> None:
    """A lead that becomes visible after the cursor passed its createdTs (within lookback) arrives once."""
    world = make_world()
    world.configure(items_per_page=3, lookback="10m")
    world.once()
    world.advance(30)
    late = world.sim.add_lead(created=world.sim.now() - timedelta(seconds=20), visible=False)["id"]
    expected = world.sim.add_leads(7)
    world.once()
    assert late not in world.created_ids()
    world.advance(240)
    world.sim.reveal_lead(late)  # a smaller id and an older createdTs than leads already sent
    world.once()
    world.advance(60)
    world.once()
    assert_exactly_once(world, [*expected, late])


def test_inserts_and_updates_during_a_walk(make_world: Callable[..., World]) -> None:
    """Leads revealed, added and updated between the pages of a walk are all delivered once, with every change."""
    world = make_world()
    sim = world.sim
    world.configure(items_per_page=4, lookback="1m", updates=True)
    world.once()
    world.advance(5)
    hidden = sim.add_lead(created=sim.now() - timedelta(seconds=3), visible=False)["id"]
    batch = sim.add_leads(14)
    added: list[int] = []

    def during_created_walk() -> None:
        sim.reveal_lead(hidden)  # sorts before the page being read: every later page shifts by one
        added.extend(sim.add_leads(2))
        sim.update_lead(batch[1], score=11)  # already read
        sim.update_lead(batch[12], score=12)  # not read yet

    def during_updated_walk() -> None:
        sim.update_lead(batch[2], score=13, qaResult="Test")
        sim.update_lead(batch[13], lead_data={"jobTitle": "Night Auditor"})
        added.extend(sim.add_leads(1))

    sim.hooks[("created", 2, 0)] = during_created_walk
    sim.hooks[("updated", 2, 0)] = during_updated_walk
    world.once()
    assert not sim.hooks, "both hooks ran mid-walk"
    for _ in range(2):
        world.advance(3)
        world.once()
    everyone = [hidden, *batch, *added]
    assert_exactly_once(world, everyone)
    assert_histories_replay(world, everyone)


@pytest.mark.parametrize(
    "fall_back",
    [datetime(2026, 10, 25, 1, 0, tzinfo=UTC), datetime(2030, 10, 27, 1, 0, tzinfo=UTC)],
    ids=["2026", "2030"],
)
def test_fall_back_inside_the_lookback(make_world: Callable[..., World], fall_back: datetime) -> None:
    """Leads and updates on both sides of the autumn clock change (Europe/London) arrive once, none missed."""
    world = make_world(start=fall_back - timedelta(minutes=40))
    sim = world.sim
    world.configure(items_per_page=3, lookback="10m", updates=True)
    world.once()
    world.at(fall_back - timedelta(seconds=30))
    before = sim.add_leads(4)  # 01:59:30+01:00: the cursor ends in summer time
    world.once()
    world.at(fall_back - timedelta(seconds=10))
    late = sim.add_lead(visible=False)["id"]  # 01:59:50+01:00, visible only after the change
    world.at(fall_back + timedelta(minutes=4))
    after = sim.add_leads(4)  # 01:04+00:00: smaller digits than the cursor, yet later
    sim.update_lead(before[1], score=5)  # its updatedTs digits go back an hour
    world.once()
    world.at(fall_back + timedelta(minutes=8))
    sim.reveal_lead(late)
    again = sim.add_leads(3)
    sim.update_lead(after[2], lead_data={"country": "Iceland"})
    world.once()
    world.at(fall_back + timedelta(minutes=90))
    later = sim.add_leads(2)
    sim.update_lead(before[0], telephone="07000000006")
    world.once()
    everyone = [*before, late, *after, *again, *later]
    assert_exactly_once(world, everyone)
    assert_histories_replay(world, everyone)
    assert {e["data"]["lead"]["id"] for e in world.updates()} == {before[0], before[1], after[2]}


def test_spring_forward_inside_the_lookback(make_world: Callable[..., World]) -> None:
    """A lead written just before the spring clock change and visible just after it is still found."""
    change = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    world = make_world(start=change - timedelta(minutes=20))
    sim = world.sim
    world.configure(items_per_page=3, lookback="10m")
    world.once()
    world.at(change - timedelta(minutes=10))
    expected = sim.add_leads(3)
    world.once()
    world.at(change - timedelta(minutes=2))
    late = sim.add_lead(visible=False)["id"]  # 00:58+00:00
    world.at(change + timedelta(minutes=5))
    expected += sim.add_leads(3)  # 02:05+01:00
    world.once()
    world.at(change + timedelta(minutes=6))
    sim.reveal_lead(late)  # within the lookback of a cursor written in +01:00
    world.once()
    assert_exactly_once(world, [*expected, late])


# --- lead updates ------------------------------------------------------------------------------


def test_updates_report_exactly_the_tracked_changes(make_world: Callable[..., World]) -> None:
    """Each tracked change gives one lead.updated with exact from/to; untracked ones and a first update give none."""
    world = make_world()
    sim = world.sim
    world.configure(items_per_page=3, updates=True)
    world.once()
    world.advance(5)
    score = sim.add_lead()["id"]
    untracked = sim.add_lead()["id"]
    data = sim.add_lead(lead_data={"jobTitle": "Engineer"})["id"]
    qa = sim.add_lead(qaResult="Caution")["id"]
    flag = sim.add_lead(qaResult="Caution")["id"]
    new_field = sim.add_lead()["id"]
    world.once()
    world.advance(10)
    before = {lead_id: sim.lead(lead_id) for lead_id in (score, data, flag)}
    sim.update_lead(score, score=7)
    sim.update_lead(untracked, optIn=False, processingCounter=7, formHash="999")
    sim.update_lead(data, lead_data={"jobTitle": "CTO"})
    sim.update_lead(qa, qaResult="Valid")
    sim.update_lead(flag, leadFlag="Invalid")
    sim.update_lead(new_field, lead_data={"budget": "50k"})
    fresh = sim.add_lead()["id"]
    sim.advance(7)
    sim.update_lead(fresh, score=3, lead_data={"jobTitle": "Intern"})  # processed before the watcher saw it
    world.once()
    world.advance(10)
    world.once()  # re-reads the same window: nothing new
    got = {e["data"]["lead"]["id"]: e["data"]["changes"] for e in world.updates()}
    assert len(world.updates()) == len(got), "one lead.updated per changed lead"
    assert got == {
        score: {"score": {"from": before[score]["score"], "to": 7}},
        data: {"leadData.jobTitle": {"from": "Engineer", "to": "CTO"}},
        qa: {
            "advertiserBillable": {"from": False, "to": True},
            "publisherBillable": {"from": False, "to": True},
            "qaResult": {
                "from": {"@id": "/api/v4/lead-qa-results/3", "@type": "LeadQaResult", "name": "Caution"},
                "to": {"@id": "/api/v4/lead-qa-results/1", "@type": "LeadQaResult", "name": "Valid"},
            },
        },
        flag: {
            "leadFlag": {
                "from": before[flag]["leadFlag"],
                "to": {"@id": "/api/v4/lead-flags/2", "@type": "LeadFlag", "name": "Invalid"},
            }
        },
        new_field: {"leadData.budget": {"from": None, "to": "50k"}},
    }
    created = {e["data"]["lead"]["id"]: e["data"]["lead"] for e in world.events("lead.created")}
    assert created[fresh]["score"] == 3, "the new lead's lead.created carries its processed state"
    assert_histories_replay(world, [score, untracked, data, qa, flag, new_field, fresh])


def test_flip_and_flip_back_within_one_second_are_three_updates(make_world: Callable[..., World]) -> None:
    """A→B, B→A, A→B in one server second, each read by its own poll, are three lead.updated with three ids."""
    world = make_world()
    sim = world.sim
    world.configure(updates=True)
    world.once()
    world.advance(5)
    lead = sim.add_lead(score=60)["id"]
    world.once()
    world.advance(5)  # from here on the server's clock stands still: every edit shares one updatedTs
    for score in (70, 60, 70):
        sim.update_lead(lead, score=score)
        world.once()
    updates = world.updates()
    assert [(e["data"]["changes"]["score"]["from"], e["data"]["changes"]["score"]["to"]) for e in updates] == [
        (60, 70),
        (70, 60),
        (60, 70),
    ]
    assert len({e["data"]["lead"]["updatedTs"] for e in updates}) == 1
    assert len(set(world.receiver.event_ids())) == len(world.receiver.event_ids()) == 4


def test_recheck_fallback_when_updated_filter_is_missing(tmp_path: Path) -> None:
    """Without an updatedTs filter the daemon warns once and still finds changes by re-reading recent leads."""
    sim = Simulator(seed=5, username=USERNAME, password=PASSWORD)
    sim.seed_data(campaigns=2, leads=10)
    sim.faults.drop_updated_ts_filter = True
    known = sim.add_lead()["id"]
    with SimulatorServer(sim) as server, Receiver() as receiver:
        config = write_config(
            tmp_path,
            server.url,
            [webhook_sink(receiver.url)],
            leads={"updates": True, "recheck_interval": 1, "recheck_window": "1d"},
        )
        with Daemon(config) as daemon:
            daemon.wait_polls(1, "leads.recheck")
            sim.update_lead(known, score=1)
            fresh = sim.add_lead()["id"]
            receiver.wait_for(lambda reqs: len(reqs) >= 2, 20, "the update and the new lead")
            sim.update_lead(fresh, lead_data={"jobTitle": "Astronaut"})
            receiver.wait_for(lambda reqs: len(reqs) >= 3, 20, "the new lead's later update")
            assert daemon.stop() == 0
        log = daemon.log()
    assert log.count("updatedTs filtering is not offered") == 1
    with reading(daemon.state) as store:
        streams = {c.stream for c in store.cursors()}
    assert "leads.recheck" in streams and "leads.updated" not in streams
    events = []
    for body in receiver.verified_events(WEBHOOK_KEY):
        validate_event(body)
        events.append(body)
    assert [(e["type"], e["data"]["lead"]["id"]) for e in events if e["type"] == "lead.updated"] == [
        ("lead.updated", known),
        ("lead.updated", fresh),
    ]
    changes = [e["data"]["changes"] for e in events if e["type"] == "lead.updated"]
    assert list(changes[0]) == ["score"] and changes[0]["score"]["to"] == 1
    assert list(changes[1]) == ["leadData.jobTitle"] and changes[1]["leadData.jobTitle"]["to"] == "Astronaut"


# --- crash ----------------------------------------------------------------------------------------


@pytest.mark.faults
def test_sigkill_mid_walk_then_restart_keeps_ids_and_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL at seeded moments while leads stream in: after restarts every lead arrives, always under its one id."""
    rng = random.Random(20261126)
    sim = Simulator(seed=3, username=USERNAME, password=PASSWORD)
    sim.seed_data(campaigns=2, leads=5)
    baseline = sim.add_leads(14)  # existed at the first start: never sent, even if that walk is killed
    sim.faults.latency = 0.02  # pages take a moment, so kills land between them
    with SimulatorServer(sim) as server, Receiver() as receiver:
        config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], convertr={"items_per_page": 4})
        daemon = Daemon(config)
        created: list[int] = []
        mid_walk = 0

        def served(n: int) -> Callable[[], bool]:
            return lambda: len(sim.requests) >= n

        for round_ in range(6):
            with daemon:
                if round_:
                    created += sim.add_leads(rng.randint(5, 13))
                target = len(sim.requests) + rng.randint(2, 14)
                wait_until(served(target), 20, f"request {target} in round {round_}")
                daemon.kill()
            walk = daemon.read(lambda store: store.cursor("leads.created"), None)
            mid_walk += bool(walk and walk.walk_from)
        sim.faults.latency = 0.0
        created += sim.add_leads(3)
        with daemon:
            wait_until(
                lambda: {r.json()["data"]["lead"]["id"] for r in receiver.requests if r.status == 200} >= set(created),
                20,
                "every lead after the last restart",
            )
            assert daemon.stop() == 0
    assert mid_walk >= 2, f"only {mid_walk} kills landed mid-walk"
    ids_by_lead: dict[int, set[str]] = defaultdict(set)
    for request in receiver.requests:
        body = request.json()
        validate_event(body)
        ids_by_lead[body["data"]["lead"]["id"]].add(request.headers["webhook-id"])
    assert set(ids_by_lead) == set(created), f"baseline leads sent: {set(ids_by_lead) & set(baseline)}"
    assert all(ids == {event_id("lead.created", f"lead:{lead}", "")} for lead, ids in ids_by_lead.items())
    with reading(daemon.state) as store:
        outbox = Counter(e["resource"] for e in store.events())
    assert outbox and max(outbox.values()) == 1, "one outbox row per change"


def test_walk_cut_after_any_page_resumes_from_its_bound(make_world: Callable[..., World], tmp_path: Path) -> None:
    """A walk stopped after any page (the state a crash or SIGTERM leaves) resumes from its starting bound,
    so leads on unread pages are found even when leads already read carry later createdTs."""
    world = make_world()
    sim = world.sim
    world.configure(items_per_page=3, lookback="30s")
    world.once()  # the baseline
    sim.advance(600)  # the watcher was down for ten minutes
    now = sim.now()
    expected: list[int] = []
    for age in (500, 100, 400, 50, 300):  # ids ascend, createdTs does not
        expected += sim.add_leads(3, created=now - timedelta(seconds=age))
    baseline = tmp_path / "state.db"

    async def cut_then_resume(config_path: Path, pages: int) -> tuple[str | None, list[int]]:
        config = load_config(config_path)
        store = Store.open(config.state.path)
        try:
            async with ConvertrClient(config.convertr, clock=SystemClock()) as client:
                done = iter(range(1, 100))
                cut = Poller(config, client, store, SystemClock(), should_stop=lambda: next(done) >= pages)
                await cut.poll_leads()
                state = store.cursor("leads.created")
                await Poller(config, client, store, SystemClock()).poll_leads()
            leads = [json.loads(e["payload"])["data"]["lead"]["id"] for e in store.events()]
            return (state.walk_from if state else None), leads
        finally:
            store.close()

    for pages in range(1, 5):
        folder = tmp_path / f"cut-after-{pages}"
        folder.mkdir()
        shutil.copy(baseline, folder / "state.db")  # as an operator copies it: `once` has exited
        sinks = [webhook_sink(world.receiver.url)]  # never called: the events wait in the outbox
        config = write_config(
            folder, world.server.url, sinks, convertr={"items_per_page": 3}, leads={"lookback": "30s"}
        )
        walk_from, leads = asyncio.run(cut_then_resume(config, pages))
        assert walk_from is not None, "the cut walk left its bound behind"
        assert sorted(leads) == sorted(expected), f"cut after page {pages}: missing {set(expected) - set(leads)}"


# --- backfill -------------------------------------------------------------------------------------

_MEASURE = """
import resource, sys
from watcher.cli import main
code = main(["once", "-c", sys.argv[1]])
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _backfill_peak_kib(folder: Path, leads: int) -> int:
    sim = Simulator(seed=8, username=USERNAME, password=PASSWORD, clock=FakeClock(T0.timestamp()))
    sim.seed_data(campaigns=2, leads=0)
    start = sim.now().isoformat()
    sim.advance(5)
    sim.add_leads(leads)
    folder.mkdir()
    with SimulatorServer(sim) as server:
        config = write_config(folder, server.url, leads={"start": start})
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(config)], capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == 0, done.stderr[-2000:]
    polls = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [p["new"] for p in polls if p.get("stream") == "leads.created"] == [leads], "the backfill read every lead"
    return int(done.stderr.rsplit("maxrss_kib", 1)[1].split()[0])


def test_backfill_memory_stays_flat(tmp_path: Path) -> None:
    """Backfilling ten times as many leads raises the process's peak memory by less than 8 MiB."""
    small = _backfill_peak_kib(tmp_path / "small", 1_500)
    large = _backfill_peak_kib(tmp_path / "large", 15_000)
    # About 4 MiB of the difference is SQLite's page cache filling to its 2 MiB cap and the jitter of
    # response buffers; keeping each lead's document (3 KB) would add some 40 MiB.
    assert large - small < 8 * 1024, f"peak RSS grew from {small} KiB to {large} KiB"


def test_backfill_reports_progress_per_page(make_world: Callable[..., World]) -> None:
    """The poller reports (leads read, total) after every page of a backfill, ending at the total."""
    world = make_world()
    start = world.sim.now().isoformat()
    world.advance(5)
    ids = world.sim.add_leads(23)
    config = load_config(world.configure(items_per_page=5, start=start))
    calls: list[tuple[int, int | None]] = []

    async def backfill() -> None:
        store = Store.open(config.state.path)
        try:
            async with ConvertrClient(config.convertr, clock=SystemClock()) as client:
                poller = Poller(config, client, store, SystemClock(), progress=lambda n, of: calls.append((n, of)))
                await poller.poll_leads()
        finally:
            store.close()

    asyncio.run(backfill())
    assert calls == [(5, 23), (10, 23), (15, 23), (20, 23), (23, 23)]
    assert len(ids) == 23


def test_once_on_a_terminal_shows_a_progress_bar(make_world: Callable[..., World]) -> None:
    """`once` with stderr on a terminal draws the progress bar up to the backfill's total."""
    world = make_world()
    start = world.sim.now().isoformat()
    world.advance(5)
    world.sim.add_leads(12)
    config = world.configure(items_per_page=5, start=start)
    master, slave = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "watcher", "once", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=slave,
    ) as proc:
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(30) == 0
    os.close(master)
    shown = b"".join(chunks).decode()
    assert "12/12 leads" in shown
    assert "[" + "#" * 30 + "]" in shown
    assert len(world.created_ids()) == 12
