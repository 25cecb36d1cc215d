"""Histories that lost or invented events (issue 19), one test each, against the real poller, store
and client in-process with the simulator on loopback (`tests.support.rig`) and a virtual clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.rig import Rig, make_rig
from watcher.poller import CREATED

SUMMER = datetime(2026, 6, 10, 9, 0, tzinfo=UTC).timestamp()


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
