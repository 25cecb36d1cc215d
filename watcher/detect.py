"""Change detection as pure functions: cursor arithmetic, snapshots, diffs, the events they make,
and the decision for each page a walk reads.

Nothing here does I/O or reads a clock; the poller passes in what the API returned, what the
store knew and the walk's state, and gets back a `PageCommit` to write.

Time filters on Convertr compare wall-clock digits in the server's zone with the offset dropped;
`watcher.servertime` learns that zone and writes the bounds. Here a cursor is an instant: the
newest timestamp read, never past the walk's signpost (the server's time at its start less a
safety lag), never backwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

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
from watcher.records import FORGOTTEN, NOTHING_UNANNOUNCED, CampaignState, LeadState, PageCommit, Unannounced
from watcher.servertime import parse_ts, write_at

__all__ = ["parse_ts"]

Route = Callable[[Event], Sequence[str]]  # the sinks an event goes to

# --- timestamps and cursors -----------------------------------------------------------------


def next_cursor(current: str | None, newest: str | None, signpost: float) -> tuple[str, float] | None:
    """The cursor after a page: the newest timestamp read, never past the signpost, never backwards.

    The signpost is the server's time at the start of the walk less a safety lag: a row written
    while the walk is under way can carry an earlier timestamp than rows already read, and the
    next walk must still reach it.
    """
    candidates: list[tuple[float, str]] = []
    if newest is not None:
        t = parse_ts(newest).timestamp()
        candidates.append((t, newest) if t <= signpost else (signpost, write_at(signpost, timedelta())))
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
        ts = timestamp(raw)
        if ts is not None and (best_ts is None or ts > best_ts):
            best, best_ts = str(raw), ts
    return best


def timestamp(raw: object) -> float | None:
    """A document's timestamp in Unix seconds, or None when it is missing or garbled."""
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return parse_ts(raw).timestamp()
    except ValueError:
        return None


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


def covers(track: Sequence[str], key: str) -> bool:
    """Whether a snapshot taken under `track` holds `key` whenever the document carries it."""
    plain, all_lead_data, names = _tracking(tuple(track))
    if key.startswith("leadData."):
        return all_lead_data or key.removeprefix("leadData.") in names
    return key in plain


def track_signature(track: Sequence[str]) -> str:
    """A short name for a `track` list, order and repeats aside: stored with every snapshot."""
    return hashlib.sha256(dumps(sorted(set(track))).encode()).hexdigest()[:12]


def diff(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    old_track: Sequence[str] | None = None,
    new_track: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """`{"field": {"from": old, "to": new}}` for every tracked field whose value moved.

    Only a value we knew can move: a field missing from either side (an API response without
    it, a field newly added to `track`) is learnt silently, never reported. leadData entries
    are the exception, because the whole list comes with every document: an entry that appears
    or vanishes while the lead had leadData before is a change (null on the missing side), but
    only for a name tracked both when `old` was taken (`old_track`) and now (`new_track`); a
    track of None covers every key.
    """
    changes: dict[str, dict[str, Any]] = {}
    had_lead_data = any(k.startswith("leadData.") for k in old)
    has_lead_data = any(k.startswith("leadData.") for k in new)
    for key in sorted(set(old) | set(new)):
        if key in old and key in new:
            if old[key] != new[key]:
                changes[key] = {"from": old[key], "to": new[key]}
        elif (
            key.startswith("leadData.")
            and had_lead_data
            and has_lead_data
            and (old_track is None or covers(old_track, key))
            and (new_track is None or covers(new_track, key))
        ):
            before, after = old.get(key), new.get(key)
            if before != after:
                changes[key] = {"from": before, "to": after}
    return changes


def merge(old: Mapping[str, Any], new: Mapping[str, Any], track: Sequence[str] | None = None) -> dict[str, Any]:
    """The snapshot after reading `new`: fields the document lacked keep their last known value,
    fields no longer tracked (under `track`, when given) are forgotten."""
    lead_data_present = any(k.startswith("leadData.") for k in new)
    kept = {
        k: v
        for k, v in old.items()
        if k not in new
        and not (lead_data_present and k.startswith("leadData."))
        and (track is None or covers(track, k))
    }
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
    """`previous` names what the lead was compared with: the id of its last lead.updated, or the
    updatedTs of its snapshot when it has none."""
    lead_id = lead["id"]
    resource = f"lead:{lead_id}"
    # updatedTs alone is not enough: edits within one second share it, and a leadData edit may
    # not move it at all. Chained on the previous change's id, with the changes themselves, the
    # id differs for every different change (A→B, B→A, A→B are three ids) and stays identical
    # when the same change is read again before it was committed.
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


# What a campaign's status is derived from: a transition is told apart from an earlier one with
# the same statuses by these, even when the state file that knew the earlier one is gone.
STATUS_SOURCES = ("updatedTs", "pauseTs", "startTs", "endTs", "signTs", "leadsRequired", "uncapped")


def campaign_status_changed(
    campaign: Mapping[str, Any], old: str, new: str, previous: str | int | None, detected_at: str
) -> Event:
    """`previous` is the id of the campaign's last status change (None for its first one seen).

    The id chains on it and on the fields the status is derived from, not on a local counter:
    A→B, B→A, A→B are three ids, and a new pause after a backup restore or on a fresh state file
    differs from every earlier one (its pauseTs does), while the same change read again after a
    crash before commit keeps its id.
    """
    resource = f"campaign:{campaign['id']}"
    sources = dumps([campaign.get(name) for name in STATUS_SOURCES])
    version = f"{previous}|{old}->{new}|{hashlib.sha256(sources.encode()).hexdigest()[:16]}"
    return Event(
        id=event_id(CAMPAIGN_STATUS_CHANGED, resource, version),
        type=CAMPAIGN_STATUS_CHANGED,
        timestamp=detected_at,
        data={"campaign": without_context(campaign, CAMPAIGN_SECRETS), "from": old, "to": new},
        resource=resource,
        campaign_id=campaign["id"],
    )


# --- decisions: one page of a walk in, one PageCommit out ---------------------------------------


@dataclass(frozen=True)
class LeadWalk:
    """What a lead walk knows while it reads pages: everything a page's decision depends on."""

    stream: str
    now: float
    detected_at: str
    signpost: float  # the cursor never passes this instant
    track: tuple[str, ...]
    updates: bool  # keep snapshots at all
    emit_after: float = float("-inf")  # created: a lead created at or before this is recorded, not announced
    horizon: float = float("inf")  # updated: an unknown lead created after this is left to the created walk
    tracks: Mapping[str, tuple[str, ...]] | None = None  # signature -> track list, for stored snapshots

    @property
    def signature(self) -> str | None:
        return track_signature(self.track) if self.updates else None


def decide_created(
    members: Sequence[Mapping[str, Any]],
    known: Mapping[int, LeadState],
    walk: LeadWalk,
    cursor: str | None,
    route: Route,
    unannounced: Unannounced = NOTHING_UNANNOUNCED,
) -> PageCommit:
    """New leads of a page: recorded (with a snapshot when updates are on), announced when created
    after `emit_after` (and after the threshold of an unreadable entry met earlier); the cursor
    moves to the newest createdTs read, within the signpost."""
    commit = PageCommit(walk.stream, walk.now)
    seen: set[int] = set()
    newest_raw: str | None = None
    newest_ts = float("-inf")
    sig = walk.signature
    for lead in members:
        lead_id = lead.get("id")
        if not isinstance(lead_id, int) or isinstance(lead_id, bool):
            continue
        created_raw = lead.get("createdTs")
        created_ts = timestamp(created_raw)
        if created_ts is not None and created_ts > newest_ts:
            newest_raw, newest_ts = str(created_raw), created_ts
        if lead_id in seen:
            continue
        seen.add(lead_id)
        threshold = _settle(commit, unannounced, lead_id, walk.emit_after)
        if lead_id in known:
            continue
        when = walk.now if created_ts is None else created_ts
        tracked = snapshot(lead, walk.track) if walk.updates else {}
        commit.leads.append(LeadState(lead_id, when, _str(lead.get("updatedTs")), tracked, sig))
        if when > threshold:
            event = lead_created(lead, walk.detected_at)
            commit.events.append((event, route(event)))
    moved = next_cursor(cursor, newest_raw, walk.signpost)
    if moved is not None:
        commit.cursor, commit.cursor_ts = moved
    return commit


def _settle(commit: PageCommit, unannounced: Unannounced, lead_id: int, threshold: float) -> float:
    """The threshold a lead read now is announced above: an unreadable entry's own rule, when the
    created walk met it unreadable, is never relaxed; the entry is answered by this commit."""
    entry = unannounced.thresholds.get(lead_id)
    if entry is None:
        return threshold
    commit.settled.append((unannounced.stream, lead_id))
    return max(threshold, entry)


def decide_updated(
    members: Sequence[Mapping[str, Any]],
    known: Mapping[int, LeadState],
    walk: LeadWalk,
    cursor: str | None,
    route: Route,
    unannounced: Unannounced = NOTHING_UNANNOUNCED,
    *,
    cursor_field: str | None = "updatedTs",
) -> PageCommit:
    """Changed leads of a page: each diffed against its snapshot, `lead.updated` for tracked changes,
    newly tracked fields learnt silently; leads seen for the first time are recorded as they are,
    except one the created walk met unreadable: it is decided by that entry's rule (announced when
    created after its threshold), whichever walk reads it first.

    `cursor_field` None: a walk that keeps no cursor (the re-read and the snapshot baseline).
    """
    commit = PageCommit(walk.stream, walk.now)
    sig = walk.signature
    latest: dict[int, LeadState] = {}
    for lead in members:
        lead_id = lead.get("id")
        if not isinstance(lead_id, int) or isinstance(lead_id, bool):
            continue
        before = latest.get(lead_id) or known.get(lead_id)
        pending = lead_id in unannounced.thresholds and lead_id not in latest
        threshold = _settle(commit, unannounced, lead_id, float("-inf")) if pending else None
        if before is not None and before.track == FORGOTTEN:
            continue  # erased on request: nothing about this person is kept or sent again
        snap = snapshot(lead, walk.track)
        version = _str(lead.get("updatedTs"))
        if before is None:
            created_ts = timestamp(lead.get("createdTs"))
            when = walk.now if created_ts is None else created_ts
            if threshold is not None:
                if when > threshold:
                    event = lead_created(lead, walk.detected_at)
                    commit.events.append((event, route(event)))
            elif when > walk.horizon:
                continue  # the created walk will still read it, and its lead.created carries this document
            latest[lead_id] = LeadState(lead_id, when, version, snap, sig)
            continue
        old_track = _track_of(before, walk)
        changes = diff(before.snapshot, snap, old_track, walk.track)
        merged = merge(before.snapshot, snap, walk.track)
        if changes:
            previous = before.last_event or before.version
            if version is not None and version == before.version:
                # updatedTs did not move, so it cannot tell this change from an earlier one with the
                # same values (one undone in between, before a backup was restored): the moment it
                # was seen does. Seen again after a crash before commit, it may then arrive twice.
                previous = f"{previous}@{walk.detected_at}"
            event = lead_updated(lead, changes, walk.detected_at, previous)
            commit.events.append((event, route(event)))
            latest[lead_id] = LeadState(lead_id, before.created_ts, version, merged, sig, event.id)
        elif merged != before.snapshot or before.track != sig:
            latest[lead_id] = LeadState(lead_id, before.created_ts, version, merged, sig, before.last_event)
    commit.leads.extend(latest.values())
    if cursor_field is not None:
        moved = next_cursor(cursor, newest([m.get(cursor_field) for m in members]), walk.signpost)
        if moved is not None:
            commit.cursor, commit.cursor_ts = moved
    return commit


def _track_of(state: LeadState, walk: LeadWalk) -> tuple[str, ...] | None:
    """The track list a stored snapshot was taken under; an empty snapshot with none covered nothing."""
    if state.track is None:
        # Written before snapshots named their track, or while updates were off: what it holds is
        # all it is known to have covered (a leadData name it lacks is learnt, never "appeared").
        return tuple(state.snapshot)
    if walk.tracks is not None and state.track in walk.tracks:
        return walk.tracks[state.track]
    return walk.track if state.track == walk.signature else ()


def decide_campaigns(
    docs: Sequence[Mapping[str, Any]],
    known: Mapping[int, CampaignState],
    *,
    baseline: bool,
    now: float,
    detected_at: str,
    route: Route,
) -> tuple[PageCommit, list[str]]:
    """New campaigns (`campaign.created`, except in the first read) and status transitions of a page.

    Returns the commit and warnings about documents that were skipped.
    """
    commit = PageCommit("campaigns", now)
    warnings: list[str] = []
    for doc in docs:
        campaign_id, status = doc.get("id"), doc.get("status")
        if not isinstance(campaign_id, int) or isinstance(campaign_id, bool) or not isinstance(status, str):
            warnings.append(f"campaign document without id or status skipped (id {campaign_id!r})")
            continue
        before = known.get(campaign_id)
        name = doc.get("name") if isinstance(doc.get("name"), str) else None
        if before is None:
            after = CampaignState(campaign_id, status, 0, name)
            if not baseline:
                event = campaign_created(doc, detected_at)
                commit.events.append((event, route(event)))
        elif before.status != status:
            event = campaign_status_changed(doc, before.status, status, before.last_event, detected_at)
            commit.events.append((event, route(event)))
            after = CampaignState(campaign_id, status, before.transitions + 1, name, event.id)
        elif before.name != name:
            after = CampaignState(campaign_id, status, before.transitions, name, before.last_event)  # renamed
        else:
            continue
        commit.campaigns.append(after)
    return commit, warnings


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
