"""Pure detection: cursor arithmetic, snapshots, diffs and event ids, as tables."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from watcher import detect
from watcher.events import event_id

LONDON = ZoneInfo("Europe/London")


@pytest.mark.parametrize(
    ("cursor", "lookback", "until", "expected"),
    [
        # the lookback is subtracted in the cursor's own offset
        ("2024-04-01T10:00:00+01:00", 600, "2024-04-01T10:00:00Z", "2024-04-01T09:50:00+01:00"),
        ("2024-01-15T10:00:00+00:00", 600, "2024-01-15T11:00:00Z", "2024-01-15T09:50:00+00:00"),
        ("2024-01-15T10:00:00+00:00", 0, "2024-01-15T11:00:00Z", "2024-01-15T10:00:00+00:00"),
        # spring forward: digits only jump ahead, nothing to widen
        ("2024-03-31T00:55:00+00:00", 600, "2024-03-31T03:00:00Z", "2024-03-31T00:45:00+00:00"),
        # spring forward between the bound and the cursor: the cursor's +01:00 is an hour too high
        ("2024-03-31T02:05:00+01:00", 600, "2024-03-31T03:00:00Z", "2024-03-31T00:55:00+00:00"),
        # fall back inside the window: wall-clock digits repeat 01:00-02:00, so write the lower offset
        ("2024-10-27T01:30:00+01:00", 600, "2024-10-27T03:00:00Z", "2024-10-27T00:20:00+00:00"),
        # the cursor is already past the fall-back: the bound is the exact instant, in winter time
        ("2024-10-27T01:05:00+00:00", 600, "2024-10-27T03:00:00Z", "2024-10-27T00:55:00+00:00"),
        # the fall-back is long past: no widening
        ("2024-11-20T10:00:00+00:00", 600, "2024-11-20T11:00:00Z", "2024-11-20T09:50:00+00:00"),
        # the server wrote +00:00 in summer (the configured zone is wrong): its own offset wins
        ("2024-06-01T10:00:00+00:00", 600, "2024-06-01T11:00:00Z", "2024-06-01T09:50:00+00:00"),
        # a fall-back far ahead of the cursor but before the walk's end still counts
        ("2030-10-27T00:50:00+01:00", 60, "2030-10-27T02:00:00Z", "2030-10-26T23:49:00+00:00"),
    ],
)
def test_filter_bound(cursor: str, lookback: float, until: str, expected: str) -> None:
    """The walk's bound is the cursor less the lookback, widened by any fall-back in the window."""
    until_dt = datetime.fromisoformat(until.replace("Z", "+00:00"))
    assert detect.filter_bound(cursor, lookback, LONDON, until_dt) == expected


def test_fall_back_rows_are_not_missed() -> None:
    """A row written after the fall-back, with smaller digits than the cursor, sorts after the bound."""
    cursor = "2024-10-27T01:50:00+01:00"  # 00:50 UTC, summer time
    later_row = "2024-10-27T01:05:00+00:00"  # 01:05 UTC, winter time: later, yet smaller digits
    bound = detect.filter_bound(cursor, 300, LONDON, datetime(2024, 10, 27, 4, tzinfo=UTC))
    # the server compares digits with the offset dropped
    assert later_row[:19] > bound[:19]


def _digits(stamp: str) -> str:
    return stamp[:19]


@pytest.mark.parametrize(
    "change", [datetime(2024, 3, 31, 1, tzinfo=UTC), datetime(2024, 10, 27, 1, tzinfo=UTC)], ids=["spring", "autumn"]
)
def test_every_later_row_sorts_after_the_bound(change: datetime) -> None:
    """For seeded cursors and lookbacks around a clock change, every row written after cursor − lookback
    has wall-clock digits above the bound's, and the bound is never more than an hour lower than needed."""
    rng = random.Random(change.month)
    for _ in range(300):
        cursor_at = change + timedelta(seconds=rng.randint(-3 * 3600, 3 * 3600))
        lookback = rng.choice([0, 30, 600, 3600, 5400])
        cursor = cursor_at.astimezone(LONDON).isoformat(timespec="seconds")
        until = cursor_at + timedelta(seconds=rng.randint(0, 2 * 3600))
        bound = detect.filter_bound(cursor, lookback, LONDON, until)
        start = cursor_at - timedelta(seconds=lookback)
        assert detect.parse_ts(bound) == start, "a server honouring offsets would read the exact instant"
        rows = [start + timedelta(seconds=s) for s in range(1, int((until - start).total_seconds()) + 1, 61)]
        for row in rows:
            row_digits = _digits(row.astimezone(LONDON).isoformat())
            assert row_digits > _digits(bound), (cursor, lookback, bound, row)
        needed = min(_digits(r.astimezone(LONDON).isoformat()) for r in [start + timedelta(seconds=1), *rows])
        slack = datetime.fromisoformat(needed) - datetime.fromisoformat(_digits(bound))
        assert slack <= timedelta(hours=1, seconds=61), (cursor, lookback, bound)


@pytest.mark.parametrize(
    ("current", "newest", "signpost", "expected"),
    [
        (None, None, 1_000.0, None),
        ("2024-01-01T00:00:10+00:00", None, 1e12, "2024-01-01T00:00:10+00:00"),
        ("2024-01-01T00:00:10+00:00", "2024-01-01T00:00:20+00:00", 1e12, "2024-01-01T00:00:20+00:00"),
        # never backwards
        ("2024-01-01T00:00:30+00:00", "2024-01-01T00:00:20+00:00", 1e12, "2024-01-01T00:00:30+00:00"),
        # never past the signpost: the signpost is written in the server zone
        (None, "2024-01-01T00:00:20+00:00", 1704067215.0, "2024-01-01T00:00:15+00:00"),
        # across an offset change the instant decides, not the digits
        ("2024-10-27T01:50:00+01:00", "2024-10-27T01:10:00+00:00", 1e12, "2024-10-27T01:10:00+00:00"),
    ],
)
def test_next_cursor(current: str | None, newest: str | None, signpost: float, expected: str | None) -> None:
    """The cursor moves to the newest timestamp read, capped by the signpost, never back."""
    moved = detect.next_cursor(current, newest, signpost, LONDON)
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
