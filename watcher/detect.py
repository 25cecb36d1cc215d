"""Change detection as pure functions: cursor arithmetic, snapshots, diffs and the events they make.

Nothing here does I/O or reads a clock; the poller passes in what the API returned and what the
store knew, and gets back values to commit.

Time filters on Convertr compare wall-clock digits in the server's zone with the offset dropped
(API Platform binds a DateTime to a `datetime` column). A row written at instant t therefore
matches `[strictly_after]=B` when t plus the zone's offset at t reads later than B's digits. For
every row after the instant S = cursor − lookback to match, B must read S plus the *lowest*
offset the zone takes between S and the end of the walk: when the zone falls back (end of summer
time) the repeated hour reads earlier than S in the old offset, and when S lies before a spring
change while the cursor lies after it, the cursor's own offset is an hour too high for S.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from watcher.events import (
    CAMPAIGN_CREATED,
    CAMPAIGN_STATUS_CHANGED,
    LEAD_CREATED,
    LEAD_UPDATED,
    Event,
    campaign_id_of,
    dumps,
    event_id,
)

# --- timestamps and cursors -----------------------------------------------------------------


def parse_ts(raw: str) -> datetime:
    """An API timestamp (`2018-06-21T08:52:48+00:00`) as an aware datetime; naive ones are taken as UTC."""
    value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def format_in_zone(instant: float, zone: ZoneInfo) -> str:
    """Unix seconds written the way the API writes timestamps: second precision, the zone's offset."""
    return datetime.fromtimestamp(int(instant), zone).isoformat(timespec="seconds")


def lowest_offset(start: datetime, until: datetime, zone: ZoneInfo) -> timedelta:
    """The lowest UTC offset `zone` takes at any moment from `start` to `until`."""
    lowest = start.astimezone(zone).utcoffset() or timedelta()
    # Every real zone stays at a lower offset for months, never less than half a day, and the end
    # of the window is always sampled: a drop is never stepped over, and a backfill over years
    # costs thousands of steps, not hundreds of thousands.
    step = timedelta(hours=12)
    t = start
    while t < until:
        t = min(t + step, until)
        lowest = min(lowest, t.astimezone(zone).utcoffset() or timedelta())
    return lowest


def filter_bound(cursor: str, lookback: float, zone: ZoneInfo, until: datetime) -> str:
    """The `[strictly_after]` value for a walk: the instant cursor − lookback, written so its digits
    sort before every row written from then until `until` (the server's time during the walk).

    The offset written is the lowest the zone takes in that window, and never above the cursor's
    own offset (what the server really wrote, should the configured zone be wrong): the digits
    then stay at or below those of every later row, and a server that did honour the offset
    would read the exact instant.
    """
    at = parse_ts(cursor)
    start = at - timedelta(seconds=lookback)
    offset = min(lowest_offset(start, max(until, start), zone), at.utcoffset() or timedelta())
    return start.astimezone(timezone(offset)).isoformat(timespec="seconds")


def bound_for_instant(instant: float, zone: ZoneInfo, until: datetime) -> str:
    """The filter bound for a walk from a moment we chose ourselves (baseline, backfill start)."""
    return filter_bound(format_in_zone(instant, zone), 0.0, zone, until)


def next_cursor(current: str | None, newest: str | None, signpost: float, zone: ZoneInfo) -> tuple[str, float] | None:
    """The cursor after a page: the newest timestamp read, never past the signpost, never backwards.

    The signpost is the server's time at the start of the walk less a safety lag: a row written
    while the walk is under way can carry an earlier timestamp than rows already read, and the
    next walk must still reach it.
    """
    candidates: list[tuple[float, str]] = []
    if newest is not None:
        t = parse_ts(newest).timestamp()
        candidates.append((t, newest) if t <= signpost else (signpost, format_in_zone(signpost, zone)))
    if current is not None:
        candidates.append((parse_ts(current).timestamp(), current))
    if not candidates:
        return None
    ts, raw = max(candidates, key=lambda c: c[0])
    return raw, ts


def newest(raws: Sequence[object], start: str | None = None) -> str | None:
    """The latest of some API timestamps by instant (digits alone mislead across an offset change);
    values that are missing or do not parse are passed over."""
    best = start
    best_ts = parse_ts(start).timestamp() if start else None
    for raw in raws:
        if not isinstance(raw, str) or not raw:
            continue
        try:
            ts = parse_ts(raw).timestamp()
        except ValueError:
            continue
        if best_ts is None or ts > best_ts:
            best, best_ts = raw, ts
    return best


# --- lead snapshots and diffs ---------------------------------------------------------------


# Campaign documents carry credentials of their own (the intake webhook key, a Facebook token):
# they are never forwarded to receivers.
CAMPAIGN_SECRETS = frozenset({"apiKey", "facebookSystemUserAccessToken"})


def without_context(doc: Mapping[str, Any], drop: frozenset[str] = frozenset()) -> dict[str, Any]:
    if "@context" not in doc and not drop:
        return dict(doc)
    return {k: v for k, v in doc.items() if k != "@context" and k not in drop}


def snapshot(lead: Mapping[str, Any], track: Sequence[str]) -> dict[str, Any]:
    """The tracked fields of a lead, flat: `leadData` entries become `leadData.<name>`.

    Fields the document does not carry are left out (not set to null), so an API response with
    a missing field is never reported as a change.
    """
    plain, all_lead_data, lead_data_names = _tracking(tuple(track))
    out = {name: lead[name] for name in plain if name in lead}
    entries = lead.get("leadData")
    if (all_lead_data or lead_data_names) and isinstance(entries, list):
        for entry in entries:
            if not isinstance(entry, Mapping):
                continue
            name = entry.get("name")
            if isinstance(name, str) and (all_lead_data or name in lead_data_names):
                out["leadData." + name] = entry.get("value")
    return out


@cache
def _tracking(track: tuple[str, ...]) -> tuple[tuple[str, ...], bool, frozenset[str]]:
    """`track` split once into plain fields, "every leadData entry", and single leadData names."""
    plain = tuple(t for t in track if t != "leadData" and not t.startswith("leadData."))
    names = frozenset(t.removeprefix("leadData.") for t in track if t.startswith("leadData."))
    return plain, "leadData" in track, names


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"field": {"from": old, "to": new}}` for every tracked field whose value moved.

    Only a value we knew can move: a field missing from either side (an API response without
    it, a field newly added to `track`) is learnt silently, never reported. leadData entries
    are the exception, because the whole list comes with every document: an entry that appears
    or vanishes while the lead had leadData before is a change (null on the missing side).
    """
    changes: dict[str, dict[str, Any]] = {}
    had_lead_data = any(k.startswith("leadData.") for k in old)
    has_lead_data = any(k.startswith("leadData.") for k in new)
    for key in sorted(set(old) | set(new)):
        if key in old and key in new:
            if old[key] != new[key]:
                changes[key] = {"from": old[key], "to": new[key]}
        elif key.startswith("leadData.") and had_lead_data and has_lead_data:
            before, after = old.get(key), new.get(key)
            if before != after:
                changes[key] = {"from": before, "to": after}
    return changes


def merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot after a change: fields the document lacked keep their last known value."""
    lead_data_present = any(k.startswith("leadData.") for k in new)
    kept = {k: v for k, v in old.items() if k not in new and not (lead_data_present and k.startswith("leadData."))}
    return {**kept, **new}


# --- events ---------------------------------------------------------------------------------


def lead_created(lead: Mapping[str, Any], detected_at: str) -> Event:
    lead_id = lead["id"]
    resource = f"lead:{lead_id}"
    return Event(
        id=event_id(LEAD_CREATED, resource, ""),
        type=LEAD_CREATED,
        timestamp=detected_at,
        data={"lead": without_context(lead)},
        resource=resource,
        campaign_id=campaign_id_of(lead.get("campaign")),
    )


def lead_updated(
    lead: Mapping[str, Any], changes: Mapping[str, Any], detected_at: str, previous: str | None = None
) -> Event:
    """`previous` is the updatedTs of the snapshot the lead was compared with."""
    lead_id = lead["id"]
    resource = f"lead:{lead_id}"
    # updatedTs alone is not enough: two edits within one second share it. The changes and the
    # version compared with make the id unique (A→B, B→A, A→B in one second are three ids) and
    # stay identical when the same change is read again before it was committed.
    fingerprint = hashlib.sha256(dumps(changes).encode()).hexdigest()[:16]
    version = f"{previous}>{lead.get('updatedTs')}:{fingerprint}"
    return Event(
        id=event_id(LEAD_UPDATED, resource, version),
        type=LEAD_UPDATED,
        timestamp=detected_at,
        data={"lead": without_context(lead), "changes": dict(changes)},
        resource=resource,
        campaign_id=campaign_id_of(lead.get("campaign")),
    )


def campaign_created(campaign: Mapping[str, Any], detected_at: str) -> Event:
    resource = f"campaign:{campaign['id']}"
    return Event(
        id=event_id(CAMPAIGN_CREATED, resource, ""),
        type=CAMPAIGN_CREATED,
        timestamp=detected_at,
        data={"campaign": without_context(campaign, CAMPAIGN_SECRETS)},
        resource=resource,
        campaign_id=campaign["id"],
    )


def campaign_status_changed(
    campaign: Mapping[str, Any], old: str, new: str, transition: int, detected_at: str
) -> Event:
    """`transition` counts this campaign's status changes: A→B, B→A, A→B are three distinct ids."""
    resource = f"campaign:{campaign['id']}"
    return Event(
        id=event_id(CAMPAIGN_STATUS_CHANGED, resource, f"{transition}:{old}->{new}"),
        type=CAMPAIGN_STATUS_CHANGED,
        timestamp=detected_at,
        data={"campaign": without_context(campaign, CAMPAIGN_SECRETS), "from": old, "to": new},
        resource=resource,
        campaign_id=campaign["id"],
    )
