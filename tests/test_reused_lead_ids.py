"""A lead id the server hands out again after its lead was deleted (MySQL's InnoDB before 8.0 restarts
its counter after the highest id left when the server restarts) names a new lead: it is announced,
and the old lead's snapshot is never diffed against the new person's document."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.rig import Rig, make_rig
from watcher import detect
from watcher.records import FORGOTTEN, LeadState

SUMMER = datetime(2026, 6, 10, 9, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with ExitStack() as stack:
        yield make_rig(tmp_path, stack, zone="Europe/London", start=SUMMER, leads=0, seed=5)


@pytest.mark.parametrize("updates", [True, False])
def test_a_reused_lead_id_is_announced_as_a_new_lead_and_invents_no_change(rig: Rig, updates: bool) -> None:
    rig.configure(items_per_page=4, lookback="30s", updates=updates)
    rig.poll()
    rig.advance(2)
    first = int(rig.sim.add_lead(qaResult="Valid")["id"])
    rig.advance(5)
    rig.poll()
    rig.sim.delete_lead(first, reuse_id=True)
    rig.advance(60)  # past the lookback: the first lead is out of the created walk's reach
    rig.poll()
    second = rig.sim.add_lead(qaResult="Invalid", email="another.person@example.com")
    assert second["id"] == first and second["email"] != rig.events("lead.created")[0]["data"]["lead"]["email"]
    rig.advance(5)
    rig.poll()
    created = rig.events("lead.created")
    assert [e["data"]["lead"]["email"] for e in created] == [
        created[0]["data"]["lead"]["email"],
        second["email"],
    ]
    assert len({e["id"] for e in created}) == 2  # a receiver deduping on webhook-id keeps both
    assert rig.updates() == []
    rig.advance(5)
    rig.sim.update_lead(first, qaResult="Valid")  # the new lead's own first change is reported
    rig.advance(5)
    rig.poll()
    if updates:
        changes = [e["data"]["changes"] for e in rig.updates()]
        assert len(changes) == 1 and changes[0]["qaResult"]["from"] != changes[0]["qaResult"]["to"]


@pytest.mark.parametrize(
    ("created", "again"),
    [
        ("2026-06-10T10:00:00+01:00", False),  # the same instant, written in another zone
        ("2026-06-10T10:00:00+00:00", False),  # the server's zone changed: stored wall time, new offset
        ("2026-06-10T10:00:00-05:30", False),
        ("2026-06-10T10:00:07+01:00", True),  # created later: another lead
        ("2026-06-12T10:00:00+01:00", True),  # later by more than any zone step
        ("2026-06-10T09:59:00+01:00", False),  # earlier: never another lead
    ],
)
def test_only_a_later_creation_makes_a_known_id_another_lead(created: str, again: bool) -> None:
    before = LeadState(7, datetime.fromisoformat("2026-06-10T10:00:00+01:00").timestamp(), None, {})
    assert detect.reused(before, detect.timestamp(created)) is again
    forgotten = LeadState(7, before.created_ts, None, {}, FORGOTTEN)
    assert not detect.reused(forgotten, detect.timestamp(created))
