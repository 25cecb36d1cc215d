"""Detection proven by a model: random histories against the real simulator, store and poller.

A Hypothesis `RuleBasedStateMachine` creates, edits, hides and pauses things on the simulator,
deletes leads and campaigns during any walk, makes leads unreadable and cures them (new ones and
ones from before the baseline), repeats and reorders leadData names, edits leads without moving
their updatedTs, moves the clock across daylight-saving changes, restarts, crashes between fetch
and commit, interrupts snapshot baselines and changes `track` before they resume, restores
backups, changes `track` and `updates`, prunes, and polls. A simple model records what
each lead and campaign looked like at the last poll that finished; after every poll the outbox
must hold exactly the changes between that and now:

- every lead that became visible after the baseline is announced once, none that existed at it;
- every tracked change a poll could see is one `lead.updated` with exactly that diff, and none is
  invented; every status change one `campaign.status_changed`;
- no event id ever names two different changes, across restarts, crashes and restores;
- no cursor passes the server's signpost.

`make test` runs a bounded profile; `make soak` runs it for ten minutes (WATCHER_SOAK_SECONDS).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.support.postgres import Database
from tests.support.rig import HookedSimulator, Rig, make_rig
from tests.support.soak import run_machine, soak
from watcher.poller import BASELINE, CREATED, UPDATED

LOOKBACK = 30.0
SAFETY_LAG = 2.0
PAGE = 4
RECHECK_INTERVAL = 1800.0  # quiet edits are re-read this often
# After this long every unreadable lead has been tried again (the slowest retry step is 6 h).
ALL_RETRIED = 6 * 3600.0 + 1
BASE_TRACK = ("qaResult", "score", "leadData")
# Moments just before clock changes in the zones below, and one far from any.
STARTS = [
    datetime(2026, 10, 25, 0, 20, tzinfo=UTC),  # London falls back at 01:00 UTC
    datetime(2026, 3, 29, 0, 20, tzinfo=UTC),  # London springs forward at 01:00 UTC
    datetime(2026, 11, 1, 5, 20, tzinfo=UTC),  # New York falls back at 06:00 UTC
    datetime(2026, 4, 4, 15, 20, tzinfo=UTC),  # Sydney falls back at 16:00 UTC
    datetime(2026, 6, 10, 9, 0, tzinfo=UTC),
]
ZONES = ["UTC", "Europe/London", "America/New_York", "Australia/Sydney"]


STEPS = [0]  # rules run, across every history of this process (the soak reports it)


class Crash(Exception):
    """The process died between reading a page and committing it."""


def tracked(doc: Mapping[str, Any], track: tuple[str, ...]) -> dict[str, Any]:
    """The model's own reading of a lead's tracked fields (independent of `detect.snapshot`): a name
    several entries share is kept once per entry, the lowest entry id under the plain name."""
    out: dict[str, Any] = {name: doc[name] for name in track if name != "leadData" and name in doc}
    if "leadData" in track:
        by_name: dict[str, list[tuple[int, Any]]] = {}
        for entry in doc.get("leadData") or []:
            data_id = int(entry["@id"].rsplit("/", 1)[1])
            by_name.setdefault(entry["name"], []).append((data_id, entry.get("value")))
        for name, entries in by_name.items():
            entries.sort()
            out["leadData." + name] = entries[0][1]
            for data_id, value in entries[1:]:
                out[f"leadData#{data_id}.{name}"] = value
    return out


def _lead_data(key: str) -> bool:
    return key.startswith(("leadData.", "leadData#"))


def expected_changes(old: Mapping[str, Any], new: Mapping[str, Any], learning: set[str]) -> dict[str, Any]:
    """Tracked values that moved; a leadData entry appearing or vanishing counts when the lead had
    entries on both sides; fields being learnt never count."""
    had = any(_lead_data(k) for k in old)
    has = any(_lead_data(k) for k in new)
    changes = {}
    for key in sorted(set(old) | set(new)):
        if key in learning:
            continue
        before, after = old.get(key), new.get(key)
        moved = key in old and key in new and before != after
        came_or_went = _lead_data(key) and had and has and (key in old) != (key in new)
        if moved or came_or_went:
            changes[key] = {"from": before, "to": after}
    return changes


def _has_leads(machine: DetectionMachine) -> bool:
    return machine.rig is not None and bool(machine.rig.sim.lead_ids())


class DetectionMachine(RuleBasedStateMachine):
    # The state's PostgreSQL database (a URL), or None for an SQLite file: each example then gets a
    # schema of its own, so every history starts from an empty state.
    POSTGRES: str | None = None
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        self.stack = ExitStack()
        self.rig: Rig | None = None

    def teardown(self) -> None:
        self.stack.close()

    # --- set-up -------------------------------------------------------------------------------

    @initialize(
        zone=st.sampled_from(ZONES),
        start=st.sampled_from(STARTS),
        skew=st.sampled_from([0.0, -7200.0, 5400.0]),
        seed=st.integers(1, 50),
    )
    def start(self, zone: str, start: datetime, skew: float, seed: int) -> None:
        folder = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="model-")))
        state = None
        if self.POSTGRES is not None:
            DetectionMachine.examples += 1
            state = {"url": self.POSTGRES, "schema": f"model_{DetectionMachine.examples}"}
        self.rig = make_rig(
            folder, self.stack, state=state, zone=zone, start=start.timestamp(), seed=seed, leads=10, skew=skew
        )
        for _ in range(PAGE):  # more campaigns than a page: their walk has page boundaries
            self.rig.sim.add_campaign()
        self.track = BASE_TRACK
        self.updates = True
        self._configure()
        self.baseline: set[int] | None = None  # leads visible at the first finished poll
        self.observed: dict[int, dict[str, Any]] = {}  # lead -> tracked fields at the last finished poll
        self.learning: dict[int, set[str]] = {}  # lead -> fields the daemon learns at the next poll
        self.dormant: dict[int, dict[str, Any]] = {}  # lead -> untracked fields the daemon has not dropped yet
        self.statuses: dict[int, str] | None = None  # campaign -> status at the last finished poll
        self.optional: set[int] = set()  # leads whose creation may or may not be announced
        self.hidden: set[int] = set()
        self.checked: set[str] = set()  # outbox ids already accounted for
        self.changes: dict[str, str] = {}  # every event id ever seen -> the change it named
        self.saved: tuple[Path, dict[str, Any]] | None = None
        self.unreadable: set[int] = set()  # poisoned now: the daemon cannot read them
        self.curing: set[int] = set()  # readable again, but perhaps not read yet (its retry is slow)
        self.quiet: dict[int, float] = {}  # lead -> when an edit left its updatedTs unmoved, not yet reported
        self.quiet_edited: dict[int, float] = {}  # lead -> its last such edit, reported or not
        self.vanished: set[int] = set()  # campaigns deleted during the poll: read before it, or not
        self.campaigns_before: set[int] | None = None  # campaigns when a stopped first campaign read began

    def _configure(self) -> None:
        assert self.rig is not None
        self.rig.configure(
            items_per_page=PAGE,
            lookback=f"{LOOKBACK:g}s",
            safety_lag=f"{SAFETY_LAG:g}s",
            updates=self.updates,
            track=list(self.track),
            quiet_edits=True,
            recheck_interval=f"{RECHECK_INTERVAL:g}s",
            recheck_window="60d",
        )

    @property
    def r(self) -> Rig:
        assert self.rig is not None
        return self.rig

    def _visible(self) -> list[int]:
        return self.r.sim.lead_ids()

    # --- what happens on Convertr ---------------------------------------------------------------

    @rule(n=st.integers(1, 6), gap=st.sampled_from([0.0, 1.0, 45.0]))
    def create_leads(self, n: int, gap: float) -> None:
        for _ in range(n):
            self.r.advance(gap)
            self.r.sim.add_lead()

    @rule(data=st.data())
    def create_hidden_then_reveal(self, data: st.DataObject) -> None:
        """A lead committed late: created now, visible a little later (within the lookback)."""
        lead = int(self.r.sim.add_lead(visible=False)["id"])
        self.r.advance(data.draw(st.sampled_from([0.0, 5.0, 20.0])))
        self.r.sim.reveal_lead(lead)

    @precondition(_has_leads)
    @rule(data=st.data(), field=st.sampled_from(["qaResult", "score", "leadData", "telephone"]))
    def edit_leads(self, data: st.DataObject, field: str) -> None:
        visible = self._visible()
        for lead in data.draw(st.lists(st.sampled_from(visible), min_size=1, max_size=4, unique=True)):
            doc = self.r.sim.lead(lead)
            if field == "qaResult":
                qa = "Invalid" if doc["qaResult"]["name"] != "Invalid" else "Valid"
                self.r.sim.update_lead(lead, qaResult=qa)
            elif field == "score":
                self.r.sim.update_lead(lead, score=(doc.get("score") or 0) + 1)
            elif field == "leadData":
                self.r.sim.update_lead(lead, lead_data={"Job Title": data.draw(st.sampled_from(["A", "B", "C"]))})
            else:  # not tracked: never an event
                self.r.sim.update_lead(lead, telephone=f"+44 20 7946 0{data.draw(st.integers(100, 999))}")

    @precondition(_has_leads)
    @rule(data=st.data())
    def hide_lead(self, data: st.DataObject) -> None:
        lead = data.draw(st.sampled_from(self._visible()))
        self.r.sim.hide_lead(lead)
        self.hidden.add(lead)

    @precondition(_has_leads)
    @rule(data=st.data(), action=st.sampled_from(["add", "set", "reverse"]), touch=st.booleans())
    def repeat_lead_data(self, data: st.DataObject, action: str, touch: bool) -> None:
        """A leadData name gets another entry, one entry of a name changes by its id, or the entries
        come in another order; with `touch` false the write leaves updatedTs alone."""
        sim = self.r.sim
        lead = data.draw(st.sampled_from(self._visible()))
        entries = sim.lead(lead)["leadData"]
        value = data.draw(st.sampled_from(["A", "B", "C"]))
        if action == "add" or not entries:
            sim.add_lead_data(lead, data.draw(st.sampled_from(["Job Title", "Industry"])), value, touch=touch)
        elif action == "set":
            entry = data.draw(st.sampled_from(entries))
            sim.set_lead_data(lead, int(entry["@id"].rsplit("/", 1)[1]), value, touch=touch)
        else:
            sim.reverse_lead_data(lead)  # no change at all: never an event
            return
        if not touch:
            self._quiet(lead)

    @precondition(_has_leads)
    @rule(data=st.data())
    def quiet_edit(self, data: st.DataObject) -> None:
        """A leadData write that leaves updatedTs unmoved: reported by the re-read within its interval."""
        lead = data.draw(st.sampled_from(self._visible()))
        self.r.sim.update_lead(lead, touch=False, lead_data={"Job Title": data.draw(st.sampled_from(["A", "B", "C"]))})
        self._quiet(lead)

    def _quiet(self, lead: int) -> None:
        now = self.r.clock.now()
        self.quiet.setdefault(lead, now)
        self.quiet_edited[lead] = now

    @rule(
        data=st.data(),
        new=st.booleans(),
        changed=st.booleans(),
        read_by=st.sampled_from(["change", "retry"]),
        restart=st.booleans(),
    )
    def unreadable_then_cured(self, data: st.DataObject, new: bool, changed: bool, read_by: str, restart: bool) -> None:
        """A lead the server cannot serialise (a new one, or one from before; at the first poll it existed
        at the baseline) is skipped, cured, then read first by a change walk or by its own retry. It sits
        between readable neighbours, so every walk that meets it can name it."""
        sim = self.r.sim
        visible = self._visible()
        if new or len(visible) < 3:
            neighbours = [int(sim.add_lead()["id"])]
            self.r.advance(1)
            lead = int(sim.add_lead()["id"])
            self.r.advance(1)
            neighbours.append(int(sim.add_lead()["id"]))
        else:
            i = data.draw(st.integers(1, len(visible) - 2))
            lead, neighbours = visible[i], [visible[i - 1], visible[i + 1]]
            for other in neighbours:  # so a walk that meets the lead reads them around it
                sim.update_lead(other, telephone=f"+44 20 7946 0{data.draw(st.integers(100, 999))}")
        sim.poison_lead(lead)
        self.unreadable.add(lead)
        if changed:
            sim.update_lead(lead, score=(sim.lead(lead).get("score") or 0) + 1)
        self.r.advance(5)
        self.r.poll(campaigns=True)
        self._check()
        if restart:
            self.r.restart()
        sim.poison_lead(lead, poisoned=False)
        self.unreadable.discard(lead)
        self.curing.add(lead)
        if read_by == "change":  # before its retry, past the created walk's reach or not
            self.r.advance(data.draw(st.sampled_from([5.0, 2 * LOOKBACK])))
            qa = "Invalid" if sim.lead(lead)["qaResult"]["name"] != "Invalid" else "Valid"
            sim.update_lead(lead, qaResult=qa)
            self.r.advance(5)
            self.r.poll(campaigns=True)
            self._check()
        self.r.advance(ALL_RETRIED)
        self.r.poll(campaigns=True)
        self.curing.clear()  # every unreadable lead has been read again by now
        self._check()

    @rule(data=st.data(), action=st.sampled_from(["pause", "resume", "add", "add_ending", "delete"]))
    def campaign(self, data: st.DataObject, action: str) -> None:
        sim = self.r.sim
        if action == "delete" and len(sim.campaign_ids()) <= 2:
            action = "add"  # leads need a campaign to go to
        if action == "delete":
            sim.delete_campaign(data.draw(st.sampled_from(sim.campaign_ids())))
        elif action == "add":
            sim.add_campaign()
        elif action == "add_ending":  # ends by time alone, with no write at all
            sim.add_campaign(endTs=sim.now_ts() + data.draw(st.sampled_from([30, 600, 4000])))
        else:
            campaign = data.draw(st.sampled_from(sim.campaign_ids()))
            if action == "pause":
                sim.pause_campaign(campaign)
            else:
                sim.resume_campaign(campaign)

    @rule(seconds=st.sampled_from([1.0, 20.0, 600.0, 1900.0, 3600.0, 5 * 3600.0]))
    def advance(self, seconds: float) -> None:
        self.r.advance(seconds)

    # --- what happens to the daemon -------------------------------------------------------------

    @rule(data=st.data(), mid_walk=st.sampled_from(["no", "lead", "campaign"]))
    def poll(self, data: st.DataObject, mid_walk: str) -> None:
        """A poll, sometimes with a lead or a campaign deleted between two of its pages: a lead after
        any page of any walk (created, baseline, updated, recheck), a campaign after the first page."""
        sim = self.r.sim
        assert isinstance(sim, HookedSimulator)
        if mid_walk == "lead" and self._visible():
            victim = data.draw(st.sampled_from(self._visible()[-2 * PAGE :]))  # likely on an early page

            def hide() -> None:
                sim.hide_lead(victim)
                self.hidden.add(victim)
                self.optional.add(victim)

            sim.countdown, sim.countdown_size = (data.draw(st.integers(1, 6)), hide), PAGE
        elif mid_walk == "campaign" and len(sim.campaign_ids()) > PAGE:
            gone = data.draw(st.sampled_from(sim.campaign_ids()[:PAGE]))

            def delete() -> None:
                sim.delete_campaign(gone)
                self.vanished.add(gone)

            sim.hooks.clear()
            sim.hooks[("campaigns", 1, PAGE)] = delete
        self.r.poll(campaigns=True)
        sim.hooks.clear()
        sim.countdown = None
        self._check()

    @precondition(lambda self: self.statuses is None and self.campaigns_before is None)
    @rule(how=st.sampled_from(["sigterm", "failed page"]))
    def first_campaign_read_stopped(self, how: str) -> None:
        """The very first campaign read stops after its first page (SIGTERM, or a page the server fails),
        and a campaign is created before a poll takes it up again: that one is announced, no other."""
        sim = self.r.sim
        assert isinstance(sim, HookedSimulator)
        self.campaigns_before = set(sim.campaign_ids())
        poller = self.r.poller or self.r.start()
        if how == "sigterm":
            poller.should_stop = lambda: True
            self.r.poll_campaigns()
            self.r.restart()
        else:
            sim.hooks[("campaigns", 1, PAGE)] = lambda: setattr(sim.faults, "error_rate", 1.0)
            with suppress(Exception):
                self.r.poll_campaigns()
            sim.hooks.clear()
            sim.faults.error_rate = 0.0
        sim.add_campaign()

    @rule(commits=st.integers(0, 3))
    def crash(self, commits: int) -> None:
        """The daemon dies after `commits` page commits of a poll, then starts again."""
        store = self.r.ensure()
        original = store.commit_page
        done = [0]

        def commit_page(page: Any) -> Any:
            if done[0] >= commits:
                raise Crash
            done[0] += 1
            return original(page)

        store.commit_page = commit_page  # type: ignore[method-assign]
        with suppress(Crash):
            self.r.poll(campaigns=True)
        # The service manager starts it again, and it polls before anything else changes.
        self.r.restart()
        self.r.poll(campaigns=True)
        self._check()

    @rule()
    def restart(self) -> None:
        self.r.restart()

    @precondition(lambda self: self.baseline is not None and self.saved is None)
    @rule()
    def backup(self) -> None:
        self.saved = (self.r.backup(), {**self._model(), "at": self.r.clock.now(), "quiet": sorted(self.quiet)})

    @precondition(lambda self: self.saved is not None)
    @rule()
    def restore(self) -> None:
        assert self.saved is not None
        path, model = self.saved
        self.r.restore(path)
        self._restore_model(model)
        self.checked = {e["id"] for e in self.r.events()}
        # An edit that left updatedTs alone since the backup is found again by the re-read alone.
        now = self.r.clock.now()
        pending = {lead for lead, at in self.quiet_edited.items() if at >= model["at"]} | set(model["quiet"])
        self.quiet = dict.fromkeys(pending, now)

    @rule(field=st.sampled_from(["score", "leadFlag"]))
    def change_track(self, field: str) -> None:
        """A field leaves or joins `track`: one it joins is learnt at the next poll, then reported."""
        joins = field not in self.track
        self.track = (*self.track, field) if joins else tuple(t for t in self.track if t != field)
        for lead, snap in self.observed.items():
            if not joins:
                # Until a poll rewrites the snapshot under the new track, the daemon still holds the
                # value: a field that rejoins before then was never out of its sight.
                if field in snap:
                    self.dormant.setdefault(lead, {})[field] = snap.pop(field)
            elif field in self.dormant.get(lead, {}):
                snap[field] = self.dormant[lead].pop(field)
            else:
                self.learning.setdefault(lead, set()).add(field)
        self._configure()
        self.r.restart()

    @precondition(
        lambda self: (
            self.updates
            and not any(self.dormant.values())
            and not {"advertiserBillable", "leadFlag"} <= set(self.track)
        )
    )
    @rule(data=st.data(), commits=st.integers(0, 2), how=st.sampled_from(["sigkill", "sigterm"]))
    def interrupted_baseline(self, data: st.DataObject, commits: int, how: str) -> None:
        """A field joins `track`, the snapshot baseline it starts is cut short (killed, or stopped by
        SIGTERM) after `commits` pages, and another joins before the daemon starts again. Then the
        leads on the first pages change (a QA result moves their billability): every change counts,
        the fields that joined included. It starts with a poll, so the re-read of quiet edits has
        just run and cannot mend the snapshots before those changes."""
        self.r.poll(campaigns=True)
        self._check()
        joining = [f for f in ("advertiserBillable", "leadFlag") if f not in self.track]
        order = data.draw(st.permutations(joining))
        self._join(order[0])
        store = self.r.ensure()
        poller = self.r.poller
        assert poller is not None
        original = store.commit_page
        done = [0]

        def commit_page(page: Any) -> Any:
            if page.stream == BASELINE:
                if how == "sigkill" and done[0] >= commits:
                    raise Crash
                done[0] += 1
            return original(page)

        store.commit_page = commit_page  # type: ignore[method-assign]
        if how == "sigterm":
            poller.should_stop = lambda: done[0] >= max(commits, 1)
        with suppress(Crash):
            self.r.poll(campaigns=True)
        for field in order[1:]:
            self._join(field)
        self.r.restart()
        self.r.poll(campaigns=True)
        self._check()
        for lead in self._visible()[: 2 * PAGE]:
            qa = "Invalid" if self.r.sim.lead(lead)["qaResult"]["name"] != "Invalid" else "Valid"
            self.r.sim.update_lead(lead, qaResult=qa)
        self.r.advance(5)
        self.r.poll(campaigns=True)
        self._check()

    def _join(self, field: str) -> None:
        """`field` joins `track` (the daemon starts again with it): learnt at its next read, then reported."""
        self.track = (*self.track, field)
        for lead in self.observed:
            self.learning.setdefault(lead, set()).add(field)
        self._configure()
        self.r.restart()

    @rule()
    def toggle_updates(self) -> None:
        self.updates = not self.updates
        if self.updates:
            # Leads first seen while updates were off have no snapshot: all they hold is learnt.
            for lead in self._visible():
                if lead not in self.observed:
                    self.learning[lead] = {"*"}
        self._configure()
        self.r.restart()

    @rule()
    def prune(self) -> None:
        now = self.r.clock.now()
        self.r.ensure().prune(now, delivered_retention=0, attempt_retention=0, snapshot_retention=90 * 86400)

    # --- the model ------------------------------------------------------------------------------

    def _model(self) -> dict[str, Any]:
        return json.loads(
            json.dumps(
                {
                    "observed": {str(k): v for k, v in self.observed.items()},
                    "learning": {str(k): sorted(v) for k, v in self.learning.items()},
                    "dormant": {str(k): v for k, v in self.dormant.items()},
                    "statuses": self.statuses,
                    "optional": sorted(self.optional),
                    "track": list(self.track),
                }
            )
        )

    def _restore_model(self, saved: dict[str, Any]) -> None:
        model = json.loads(json.dumps(saved))  # the backup's model stays as it was for the next restore
        self.observed = {int(k): v for k, v in model["observed"].items()}
        self.learning = {int(k): set(v) for k, v in model["learning"].items()}
        self.dormant = {int(k): v for k, v in model["dormant"].items()}
        self.statuses = {int(k): v for k, v in model["statuses"].items()} if model["statuses"] else None
        self.optional = set(model["optional"])
        # The state file comes back with the track of its day; the configuration keeps today's.
        then, now = set(model["track"]), set(self.track)
        for lead, snap in self.observed.items():
            for field in then - now:
                if field in snap:  # held by the restored file until a poll rewrites it
                    self.dormant.setdefault(lead, {})[field] = snap.pop(field)
            for field in now - then:
                if field in self.dormant.get(lead, {}):  # the restored file still holds it
                    snap[field] = self.dormant[lead].pop(field)
                else:
                    self.learning.setdefault(lead, set()).add(field)

    def _remember(self, event: Mapping[str, Any]) -> None:
        """No id may ever name two different changes."""
        data = event["data"]
        if event["type"] == "lead.created":
            change = f"created {event['resource']}"
        elif event["type"] == "lead.updated":
            change = f"{event['resource']} {json.dumps(data['changes'], sort_keys=True)}"
        elif event["type"] == "campaign.status_changed":
            c = data["campaign"]
            change = f"{event['resource']} {data['from']}->{data['to']} {c.get('pauseTs')} {c.get('updatedTs')}"
        else:
            change = f"{event['type']} {event['resource']}"
        seen = self.changes.setdefault(event["id"], change)
        assert seen == change, f"id {event['id']} names two changes: {seen!r} and {change!r}"

    def _check(self) -> None:
        """After a finished poll: the events since the last check are exactly the changes since then."""
        sim = self.r.sim
        events = [e for e in self.r.events() if e["id"] not in self.checked]
        for event in events:
            self._remember(event)
        visible = set(self._visible())
        if self.baseline is None:
            self.baseline = visible
        created = Counter(e["data"]["lead"]["id"] for e in self.r.events("lead.created"))
        for lead, count in created.items():
            assert lead not in self.baseline, f"lead {lead} existed at the baseline but was announced"
            assert count == 1, f"lead {lead} announced {count} times"
        for lead in visible - self.baseline - self.optional - self.unreadable - self.curing:
            assert created[lead] == 1, f"lead {lead} became visible after the baseline but was not announced"
        updates: dict[int, list[dict[str, Any]]] = {}
        for event in events:
            if event["type"] == "lead.updated":
                updates.setdefault(event["data"]["lead"]["id"], []).append(event["data"]["changes"])
        for lead in sorted(visible | set(updates)):
            now = tracked(sim.lead(lead), self.track)
            if not self.updates:
                assert lead not in updates, f"lead {lead}: lead.updated while updates are off"
                continue
            if lead in self.unreadable:
                assert lead not in updates, f"lead {lead}: lead.updated while the server cannot read it"
                continue
            if lead in self.curing and lead not in updates:
                continue  # not read since it was cured, or read with nothing to report: its retry will tell
            if lead in self.hidden or lead not in self.observed or "*" in self.learning.get(lead, set()):
                assert len(updates.get(lead, [])) <= 1
                self.observed[lead] = now
                self.learning.pop(lead, None)
                self.quiet.pop(lead, None)
                continue
            got = updates.get(lead, [])
            want = expected_changes(self.observed[lead], now, self.learning.get(lead, set()))
            quiet_since = self.quiet.get(lead)
            if quiet_since is not None and want and not got and self.r.clock.now() < quiet_since + RECHECK_INTERVAL:
                continue  # the re-read has not come round yet: the daemon still holds the lead as it was
            self.quiet.pop(lead, None)
            self.learning.pop(lead, None)
            assert got == ([want] if want else []), f"lead {lead}: expected {want}, outbox has {got}"
            self.observed[lead] = now
        statuses = {c: sim.campaign(c)["status"] for c in sim.campaign_ids()}
        transitions = Counter(
            (e["data"]["campaign"]["id"], e["data"]["from"], e["data"]["to"])
            for e in events
            if e["type"] == "campaign.status_changed" and e["data"]["campaign"]["id"] not in self.vanished
        )
        if self.statuses is not None:
            wanted = Counter(
                (c, self.statuses[c], s) for c, s in statuses.items() if c in self.statuses and self.statuses[c] != s
            )
            assert transitions == wanted, f"campaign transitions {dict(transitions)}, expected {dict(wanted)}"
            added = {e["data"]["campaign"]["id"] for e in events if e["type"] == "campaign.created"}
            assert added - self.vanished == set(statuses) - set(self.statuses)
        elif self.campaigns_before is not None:
            added = {e["data"]["campaign"]["id"] for e in events if e["type"] == "campaign.created"}
            assert added - self.vanished == set(statuses) - self.campaigns_before - self.vanished
        self.statuses = statuses
        self.vanished.clear()
        self.checked |= {e["id"] for e in events}
        if self.updates:
            self.dormant.clear()  # every snapshot was rewritten under the current track by this poll

    @invariant()
    def cursors_never_pass_the_signpost(self) -> None:
        STEPS[0] += 1
        if self.rig is None or self.rig.store is None:
            return
        server_now = self.rig.sim.now_ts()
        for stream in (CREATED, UPDATED):
            cursor = self.rig.store.cursor(stream)
            if cursor is not None and cursor.cursor_ts is not None:
                assert cursor.cursor_ts <= server_now - SAFETY_LAG + 1e-6, f"{stream} cursor past the signpost"


def test_detection_matches_the_model() -> None:
    """A bounded profile of random histories: every invariant holds after every step."""
    run_machine(DetectionMachine, examples=12, steps=25, derandomize=True)


def test_detection_matches_the_model_on_postgresql(postgres_db: Database) -> None:
    """The same bounded profile (fewer histories) on a PostgreSQL state; backups are pg_dump, restores pg_restore."""

    class OnPostgres(DetectionMachine):
        POSTGRES = postgres_db.url

    run_machine(OnPostgres, examples=6, steps=25, derandomize=True)


@pytest.mark.soak
@pytest.mark.timeout(0)  # it runs for WATCHER_SOAK_SECONDS and stops by itself
def test_detection_soak() -> None:
    """The same machine for WATCHER_SOAK_SECONDS (make soak: ten minutes), fresh random histories each round."""
    rounds, seconds = soak(DetectionMachine, examples=20, steps=40)
    print(
        f"soak: {rounds} rounds of 20 random histories, {STEPS[0]} steps in all, {seconds:.0f} s, every invariant held"
    )
