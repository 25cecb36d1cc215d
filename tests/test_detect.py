"""Pure detection: cursor arithmetic, snapshots, diffs and event ids, as tables."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from watcher import detect
from watcher.events import event_id
from watcher.records import CampaignState, LeadState

LONDON = ZoneInfo("Europe/London")


@pytest.mark.parametrize(
    ("current", "newest", "signpost", "expected"),
    [
        (None, None, 1_000.0, None),
        ("2024-01-01T00:00:10+00:00", None, 1e12, "2024-01-01T00:00:10+00:00"),
        ("2024-01-01T00:00:10+00:00", "2024-01-01T00:00:20+00:00", 1e12, "2024-01-01T00:00:20+00:00"),
        # never backwards
        ("2024-01-01T00:00:30+00:00", "2024-01-01T00:00:20+00:00", 1e12, "2024-01-01T00:00:30+00:00"),
        # never past the signpost, which is written in UTC
        (None, "2024-01-01T00:00:20+00:00", 1704067215.0, "2024-01-01T00:00:15+00:00"),
        # across an offset change the instant decides, not the digits
        ("2024-10-27T01:50:00+01:00", "2024-10-27T01:10:00+00:00", 1e12, "2024-10-27T01:10:00+00:00"),
    ],
)
def test_next_cursor(current: str | None, newest: str | None, signpost: float, expected: str | None) -> None:
    """The cursor moves to the newest timestamp read, capped by the signpost, never back."""
    moved = detect.next_cursor(current, newest, signpost)
    assert (moved[0] if moved else None) == expected


def test_newest_compares_instants() -> None:
    """`newest` picks by instant, so +00:00 after a fall-back beats larger +01:00 digits."""
    assert detect.newest(["2024-10-27T01:50:00+01:00", "2024-10-27T01:10:00+00:00", None]) == (
        "2024-10-27T01:10:00+00:00"
    )


LEAD = {
    "@context": "/api/v4/contexts/Lead",
    "id": 7,
    "email": "a@example.com",
    "score": 80,
    "qaResult": {"@id": "/api/v4/lead-qa-results/2", "@type": "LeadQaResult", "name": "Caution"},
    "leadData": [{"name": "country", "value": "UK"}, {"name": "jobTitle", "value": "CTO"}],
    "updatedTs": "2024-01-01T00:00:00+00:00",
    "campaign": "/api/v4/campaigns/601",
}
TRACK = ("email", "score", "qaResult", "telephone", "leadData")


def test_snapshot_flattens_lead_data_and_skips_absent_fields() -> None:
    """Tracked leadData entries become leadData.<name>; a field the document lacks is left out."""
    assert detect.snapshot(LEAD, TRACK) == {
        "email": "a@example.com",
        "score": 80,
        "qaResult": LEAD["qaResult"],
        "leadData.country": "UK",
        "leadData.jobTitle": "CTO",
    }
    assert detect.snapshot(LEAD, ("leadData.country",)) == {"leadData.country": "UK"}


@pytest.mark.parametrize(
    ("old", "new", "changes"),
    [
        ({"score": 80}, {"score": 80}, {}),
        ({"score": 80}, {"score": 100}, {"score": {"from": 80, "to": 100}}),
        ({"score": 80}, {}, {}),  # a missing field is not a change
        ({}, {"score": 5}, {}),  # never known before (schema drift, newly tracked): learnt, not reported
        ({}, {"telephone": None}, {}),
        ({"leadData.a": "1"}, {"leadData.a": "1", "leadData.b": "2"}, {"leadData.b": {"from": None, "to": "2"}}),
        ({"score": 1}, {"leadData.b": "2"}, {}),  # leadData first seen: learnt
        (
            {"leadData.a": "1", "leadData.b": "2"},
            {"leadData.a": "1"},
            {"leadData.b": {"from": "2", "to": None}},
        ),
        (
            {"qaResult": {"name": "Caution"}},
            {"qaResult": {"name": "Valid"}},
            {"qaResult": {"from": {"name": "Caution"}, "to": {"name": "Valid"}}},
        ),
    ],
)
def test_diff(old: dict[str, object], new: dict[str, object], changes: dict[str, object]) -> None:
    """`diff` reports exactly the tracked fields that moved, as from/to pairs."""
    assert detect.diff(old, new) == changes


def test_merge_keeps_fields_the_document_lacked() -> None:
    """A field missing from one response keeps its last known value in the snapshot."""
    assert detect.merge({"score": 1, "email": "x"}, {"score": 2}) == {"score": 2, "email": "x"}
    assert detect.merge({"leadData.a": "1", "score": 1}, {"leadData.b": "2"}) == {
        "leadData.b": "2",
        "score": 1,
    }


def test_lead_created_event() -> None:
    """lead.created carries the document without @context, a stable id and the campaign id."""
    event = detect.lead_created(LEAD, "2024-01-01T00:00:01.000Z")
    assert event.id == event_id("lead.created", "lead:7", "")
    assert event.id == detect.lead_created(LEAD, "2099-01-01T00:00:00.000Z").id
    assert "@context" not in event.data["lead"]
    assert event.campaign_id == 601
    assert event.resource == "lead:7"


def test_lead_updated_ids_distinguish_changes_within_one_second() -> None:
    """Two different edits sharing an updatedTs get different ids; the same edit read twice, the same id."""
    a = detect.lead_updated(LEAD, {"score": {"from": 80, "to": 90}}, "t")
    b = detect.lead_updated(LEAD, {"score": {"from": 90, "to": 100}}, "t")
    again = detect.lead_updated(LEAD, {"score": {"from": 80, "to": 90}}, "later")
    assert a.id != b.id
    assert a.id == again.id


def test_lead_updated_ids_distinguish_a_flip_back_within_one_second() -> None:
    """A→B, B→A, A→B read by three polls within one second are three ids; each re-read keeps its id."""
    second = str(LEAD["updatedTs"])
    there, back = {"score": {"from": 80, "to": 90}}, {"score": {"from": 90, "to": 80}}
    ids = [
        detect.lead_updated(LEAD, there, "t", "2023-12-31T23:59:00+00:00").id,
        detect.lead_updated(LEAD, back, "t", second).id,
        detect.lead_updated(LEAD, there, "t", second).id,
    ]
    assert len(set(ids)) == 3
    assert ids[2] == detect.lead_updated(LEAD, there, "later", second).id


def test_campaign_transitions_back_and_forth_are_distinct() -> None:
    """A→B, B→A, A→B are three events with three ids."""
    doc = {"id": 5, "status": "Paused"}
    ids = {
        detect.campaign_status_changed(doc, "Active", "Paused", 1, "t").id,
        detect.campaign_status_changed(doc, "Paused", "Active", 2, "t").id,
        detect.campaign_status_changed(doc, "Active", "Paused", 3, "t").id,
    }
    assert len(ids) == 3


def test_event_ids_have_the_contract_shape() -> None:
    """Ids are `evt_` followed by letters and digits."""
    value = event_id("lead.created", "lead:1", "")
    assert value.startswith("evt_") and value[4:].isalnum() and len(value) == 36


# --- page decisions ------------------------------------------------------------------------------

PAGE_TRACK = ("qaResult", "score", "leadData")
ROUTE = lambda event: ["crm"]  # noqa: E731


def _lead(lead_id: int, created: str, updated: str | None = None, **fields: object) -> dict[str, object]:
    return {
        "id": lead_id,
        "createdTs": created,
        "updatedTs": updated or created,
        "campaign": "/api/v4/campaigns/7",
        **fields,
    }


def _walk(stream: str = "leads.created", **kwargs: object) -> detect.LeadWalk:
    values: dict[str, object] = {"signpost": 1e12, "track": PAGE_TRACK, "updates": True, **kwargs}
    return detect.LeadWalk(stream, 1_000.0, "t", **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("known", "emit_after", "announced", "recorded"),
    [
        ((), float("-inf"), [1, 2], [1, 2]),  # both new
        ((1,), float("-inf"), [2], [2]),  # a known lead is skipped
        ((), 1704067215.0, [2], [1, 2]),  # created at or before emit_after: recorded, not announced
    ],
)
def test_decide_created(known: tuple[int, ...], emit_after: float, announced: list[int], recorded: list[int]) -> None:
    """New leads are recorded; those created after emit_after are announced; known ones are skipped."""
    page = [_lead(1, "2024-01-01T00:00:10+00:00"), _lead(2, "2024-01-01T00:00:20+00:00")]
    states = {i: LeadState(i, detect.parse_ts(str(page[i - 1]["createdTs"])).timestamp(), None, {}) for i in known}
    commit = detect.decide_created(page, states, _walk(emit_after=emit_after), None, ROUTE)
    assert [e.data["lead"]["id"] for e, _ in commit.events] == announced
    assert [s.id for s in commit.leads] == recorded
    assert commit.cursor == "2024-01-01T00:00:20+00:00"


def test_decide_created_keeps_no_snapshot_without_updates() -> None:
    """With updates off a new lead is remembered as seen, with no snapshot and no track."""
    commit = detect.decide_created(
        [_lead(1, "2024-01-01T00:00:10+00:00", score=3)], {}, _walk(updates=False), None, ROUTE
    )
    assert (commit.leads[0].snapshot, commit.leads[0].track) == ({}, None)


@pytest.mark.parametrize(
    ("before", "after", "events", "rewritten"),
    [
        ({"score": 1}, {"score": 2}, [{"score": {"from": 1, "to": 2}}], True),
        ({"score": 1}, {"score": 1}, [], False),  # nothing moved: nothing written
        ({}, {"score": 1}, [], True),  # a field first present is learnt, not reported
    ],
)
def test_decide_updated(
    before: dict[str, object], after: dict[str, object], events: list[object], rewritten: bool
) -> None:
    """A known lead is diffed against its snapshot: a change is an event, a new field is learnt silently."""
    sig = detect.track_signature(PAGE_TRACK)
    known = {1: LeadState(1, 1704067210.0, "v0", before, sig, None)}  # created 00:00:10
    page = [_lead(1, "2024-01-01T00:00:10+00:00", "2024-01-01T00:01:00+00:00", **after)]
    commit = detect.decide_updated(page, known, _walk("leads.updated"), None, ROUTE)
    assert [e.data["changes"] for e, _ in commit.events] == events
    assert bool(commit.leads) == rewritten
    if events:
        assert commit.leads[0].last_event == commit.events[0][0].id


def test_decide_updated_chains_ids_on_the_previous_change() -> None:
    """The same change from a different previous event is a different id; from the same one, the same id."""
    page = [_lead(1, "2024-01-01T00:00:10+00:00", "2024-01-01T00:01:00+00:00", score=2)]
    sig = detect.track_signature(PAGE_TRACK)

    def event_after(previous: str | None) -> str:
        known = {1: LeadState(1, 1704067210.0, "v", {"score": 1}, sig, previous)}
        return detect.decide_updated(page, known, _walk("leads.updated"), None, ROUTE).events[0][0].id

    assert event_after("evt_a") != event_after("evt_b")
    assert event_after("evt_a") == event_after("evt_a")


@pytest.mark.parametrize(
    ("created", "horizon", "recorded"),
    [
        ("2024-01-01T00:00:10+00:00", 1704067200.0 + 60, True),  # before the horizon: recorded as first seen
        ("2024-01-01T00:05:00+00:00", 1704067200.0 + 60, False),  # the created walk will still read it
    ],
)
def test_decide_updated_leaves_unknown_new_leads_to_the_created_walk(
    created: str, horizon: float, recorded: bool
) -> None:
    """An unknown lead is recorded without an event, unless the created walk is sure to read (and announce) it."""
    commit = detect.decide_updated(
        [_lead(1, created, score=5)], {}, _walk("leads.updated", horizon=horizon), None, ROUTE
    )
    assert commit.events == [] and bool(commit.leads) == recorded


def test_lead_data_entry_appearing_is_reported_only_when_it_was_tracked() -> None:
    """An entry that appears counts when its name was tracked before; a newly tracked name is learnt."""
    old = {"leadData.a": "1"}
    new = {"leadData.a": "1", "leadData.b": "2"}
    assert detect.diff(old, new, ("leadData",), ("leadData",)) == {"leadData.b": {"from": None, "to": "2"}}
    assert detect.diff(old, new, ("leadData.a",), ("leadData.a", "leadData.b")) == {}


@pytest.mark.parametrize(
    ("known", "baseline", "types"),
    [
        ({}, True, []),  # the first read records
        ({}, False, ["campaign.created"]),
        ({7: CampaignState(7, "Active", 0)}, False, ["campaign.status_changed"]),
        ({7: CampaignState(7, "Paused", 1)}, False, []),
    ],
)
def test_decide_campaigns(known: dict[int, CampaignState], baseline: bool, types: list[str]) -> None:
    """New campaigns after the first read and status transitions are events; a status unchanged is not."""
    doc = {"id": 7, "status": "Paused", "name": "Q1", "pauseTs": "2024-01-01T00:00:00+00:00"}
    commit, warnings = detect.decide_campaigns([doc], known, baseline=baseline, now=1.0, detected_at="t", route=ROUTE)
    assert [e.type for e, _ in commit.events] == types and warnings == []


def test_decide_campaigns_skips_documents_without_id_or_status() -> None:
    """A campaign document without an id or status is skipped with a warning, never a crash."""
    commit, warnings = detect.decide_campaigns([{"id": "x"}], {}, baseline=False, now=1.0, detected_at="t", route=ROUTE)
    assert commit.events == [] and len(warnings) == 1
