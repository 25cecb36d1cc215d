"""The walks' own faults, generated: capped page sizes, answers too large to read, leads unreadable
then cured, rows leaving mid-walk, and arrivals between and during the pages of a walk.

A second Hypothesis state machine beside `tests/test_model.py` (same rig, same receiver's view):
after every poll the outbox holds one `lead.created` for every lead that became visible after the
baseline and is readable, none for a lead that existed at the baseline, and never two for one.
A lead that is unreadable (poisoned, or larger than `max_response_bytes`) may wait; once cured it
is announced by the first poll after its retry is due. `make test` runs a bounded profile; `make
soak` runs it for its share of WATCHER_SOAK_SECONDS.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.support.rig import HookedSimulator, Rig, make_rig
from tests.support.soak import run_machine, soak

PAGE = 4
BIG = "x" * 70_000  # over the 65 536 bytes the machine allows an answer
START = datetime(2026, 6, 10, 9, 0, tzinfo=UTC).timestamp()
RETRY = 301.0  # past an unreadable lead's first retry


class WalkMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.stack = ExitStack()
        self.rig: Rig | None = None

    def teardown(self) -> None:
        self.stack.close()

    @initialize(seed=st.integers(1, 50), updates=st.booleans())
    def start(self, seed: int, updates: bool) -> None:
        folder = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="model-load-")))
        self.rig = make_rig(folder, self.stack, start=START, seed=seed, leads=6)
        self.rig.configure(
            items_per_page=PAGE,
            lookback="30s",
            safety_lag="2s",
            updates=updates,
            convertr={"max_response_bytes": 65_536},
        )
        self.baseline: set[int] | None = None
        self.broken: set[int] = set()  # unreadable now: poisoned or oversized
        self.optional: set[int] = set()  # may or may not be announced (hidden mid-walk)
        self.hidden: set[int] = set()

    @property
    def r(self) -> Rig:
        assert self.rig is not None
        return self.rig

    def _visible(self) -> list[int]:
        return self.r.sim.lead_ids()

    # --- what happens on the server -------------------------------------------------------------

    @rule(n=st.integers(1, 12), gap=st.sampled_from([0.0, 1.0, 45.0]))
    def create_leads(self, n: int, gap: float) -> None:
        self.r.advance(gap)
        self.r.sim.add_leads(n)

    @rule(size=st.sampled_from([0, 3, 5, 7]))
    def cap_page_size(self, size: int) -> None:
        """API Platform's maximum_items_per_page (0: none below what is asked)."""
        self.r.sim.faults.max_items_per_page = size

    # Only leads the baseline did not hold: one unreadable at the baseline and cured later is issue
    # 19 item 2 (tests/test_model.py's family; this machine found it again before it was excluded).
    @precondition(lambda self: self.baseline is not None and bool(set(self._visible()) - self.baseline))
    @rule(data=st.data(), how=st.sampled_from(["poison", "oversize"]))
    def break_lead(self, data: st.DataObject, how: str) -> None:
        assert self.baseline is not None
        lead = data.draw(st.sampled_from(sorted(set(self._visible()) - self.baseline)[-3 * PAGE :]))
        if how == "poison":
            self.r.sim.poison_lead(lead)
        else:
            self.r.sim.update_lead(lead, lead_data={"Notes": BIG})
        self.broken.add(lead)

    @precondition(lambda self: bool(self.broken))
    @rule()
    def cure(self) -> None:
        cured = set(self.broken)
        for lead in self.broken:
            self.r.sim.poison_lead(lead, poisoned=False)
            if any(e.get("value") == BIG for e in self.r.sim.lead(lead).get("leadData") or []):
                self.r.sim.update_lead(lead, lead_data={"Notes": "short again"})
        self.broken.clear()
        self.r.advance(RETRY)
        # A cured lead is owed by the first poll after its retry is due; a retry that already ran
        # and failed (the lead still broken then) put the next one further out on its schedule.
        due = max((u.next_try for u in self.r.ensure().unreadable() if u.lead_id in cured), default=0.0)
        if due > self.r.clock.now():
            self.r.advance(due - self.r.clock.now() + 1)

    @precondition(lambda self: bool(self.rig and self.rig.sim.lead_ids()))
    @rule(data=st.data())
    def delete_lead(self, data: st.DataObject) -> None:
        lead = data.draw(st.sampled_from(self._visible()))
        self.r.sim.hide_lead(lead)
        self.hidden.add(lead)

    @rule(seconds=st.sampled_from([1.0, 11.0, 40.0, 400.0]))
    def advance(self, seconds: float) -> None:
        self.r.advance(seconds)

    # --- the daemon -----------------------------------------------------------------------------

    @rule(
        data=st.data(),
        during=st.sampled_from(["nothing", "delete", "arrive", "both"]),
        walk=st.sampled_from(["created", "updated"]),
        page=st.integers(1, 3),
    )
    def poll(self, data: st.DataObject, during: str, walk: str, page: int) -> None:
        """A poll, with rows leaving and leads arriving between the pages of one of its walks."""
        sim = self.r.sim
        assert isinstance(sim, HookedSimulator)
        visible = self._visible()
        victim = data.draw(st.sampled_from(visible)) if visible and during in ("delete", "both") else None

        def between_pages() -> None:
            if victim is not None and victim in sim.lead_ids():
                sim.hide_lead(victim)
                self.hidden.add(victim)
                self.optional.add(victim)
            if during in ("arrive", "both"):
                self.r.advance(1)
                self.optional.update(sim.add_leads(PAGE + 1))  # this walk or the next reads them

        sim.hooks.clear()
        if during != "nothing":
            sim.hooks[(walk, page, 0)] = between_pages
        self.r.poll()
        sim.hooks.clear()
        self._check()

    @rule()
    def restart(self) -> None:
        self.r.restart()

    # --- the receiver's view --------------------------------------------------------------------

    def _check(self) -> None:
        visible = set(self._visible())
        if self.baseline is None:
            # Leads that arrived during the baseline's own walk may be part of it or announced.
            self.baseline = visible - self.optional
        created = self.r.created()
        for lead, count in created.items():
            assert count == 1, f"lead {lead} announced {count} times"
            assert lead not in self.baseline, f"lead {lead} existed at the baseline but was announced"
        due = visible - self.baseline - self.optional - self.broken - self.hidden
        missing = sorted(lead for lead in due if created[lead] != 1)
        assert not missing, f"leads {missing} visible, readable and not announced"
        # Leads read this time are no longer "maybe": from now on they must stay announced once.
        self.optional -= set(created)

    @invariant()
    def no_id_names_two_events(self) -> None:
        if self.rig is None or self.rig.store is None:
            return
        ids = [e["id"] for e in self.rig.events()]
        assert len(ids) == len(set(ids))
        kinds = Counter((e["type"], e["resource"]) for e in self.rig.events("lead.created"))
        assert all(n == 1 for n in kinds.values())


def test_walks_match_the_model() -> None:
    """A bounded profile of random histories of the walks' own faults."""
    run_machine(WalkMachine, examples=5, steps=15, derandomize=True)


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_walks_soak() -> None:
    """The same machine for a third of WATCHER_SOAK_SECONDS (default 600), fresh histories each round."""
    rounds, seconds = soak(WalkMachine, examples=10, steps=30, share=1 / 3)
    print(f"walk soak: {rounds} rounds of 10 random histories, {seconds:.0f} s, every invariant held")
