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
    LEAD_DATA_REPEAT,
    LEAD_UPDATED,
    Event,
    campaign_id_of,
    dumps,
    event_id,
    lead_data_key,
    lead_data_name,
)
from watcher.records import (
    FORGOTTEN,
    NOTHING_UNANNOUNCED,
    NOWHERE,
    CampaignState,
    LeadState,
    PageCommit,
    Place,
    Unannounced,
)
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
    a missing field is never reported as a change. A name that several entries share is kept for
    each of them (`repeated_entries`), so a change to any is seen and their order counts for nothing.
    """
    plain, all_lead_data, lead_data_names = _tracking(tuple(track))
    out = {name: lead[name] for name in plain if name in lead}
    entries = lead.get("leadData")
    if (all_lead_data or lead_data_names) and isinstance(entries, list):
        by_name: dict[str, list[Mapping[str, Any]]] = {}
        for entry in entries:
            if not isinstance(entry, Mapping):
                continue
            name = entry.get("name")
            if isinstance(name, str) and (all_lead_data or name in lead_data_names):
                by_name.setdefault(name, []).append(entry)
        for name, group in by_name.items():
            if len(group) == 1:
                out[lead_data_key(name)] = group[0].get("value")
            else:
                out.update(repeated_entries(name, group))
    return out


def repeated_entries(name: str, group: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Keys for the entries of a leadData name that occurs more than once.

    Each is told apart by its entry id (the number that ends its `@id`): the lowest keeps
    `leadData.<name>`, every other is `leadData#<id>.<name>`. Ids stay with their entries, so
    serving them in another order changes nothing. Entries without an id are ranked by value
    instead (`leadData#2.<name>`, `#3`, …): their order still counts for nothing, and a changed
    value is reported against the value that ranked where it now ranks.
    """
    ids = [i for i in (_entry_id(e) for e in group) if i is not None]
    if len(ids) == len(group) and len(set(ids)) == len(ids):
        ranked = sorted(zip(ids, group, strict=True), key=lambda pair: pair[0])
        first_id = ranked[0][0]
        return {lead_data_key(name, None if i == first_id else i): e.get("value") for i, e in ranked}
    values = sorted((e.get("value") for e in group), key=dumps)
    return {lead_data_key(name, None if rank == 1 else rank): v for rank, v in enumerate(values, start=1)}


def _entry_id(entry: Mapping[str, Any]) -> int | None:
    iri = entry.get("@id")
    if isinstance(iri, str):
        tail = iri.rstrip("/").rpartition("/")[2]
        if tail.isdigit():
            return int(tail)
    return None


@cache
def _tracking(track: tuple[str, ...]) -> tuple[tuple[str, ...], bool, frozenset[str]]:
    """`track` split once into plain fields, "every leadData entry", and single leadData names."""
    plain = tuple(t for t in track if t != "leadData" and not t.startswith("leadData."))
    names = frozenset(t.removeprefix("leadData.") for t in track if t.startswith("leadData."))
    return plain, "leadData" in track, names


def covers(track: Sequence[str], key: str) -> bool:
    """Whether a snapshot taken under `track` holds `key` whenever the document carries it."""
    plain, all_lead_data, names = _tracking(tuple(track))
    name = lead_data_name(key)
    if name is not None:
        return all_lead_data or name in names
    return key in plain


def _is_lead_data(key: str) -> bool:
    return lead_data_name(key) is not None


def track_signature(track: Sequence[str]) -> str:
    """A short name for a `track` list, order and repeats aside: stored with every snapshot.

    It also names how snapshots are taken: one written before repeated leadData names were each
    kept (`legacy_signature`) is told apart, so its single value for such a name is not compared.
    """
    return _signature(tuple(track))


@cache
def _signature(track: tuple[str, ...]) -> str:
    return hashlib.sha256(dumps({"track": sorted(set(track)), "leadData": "every entry"}).encode()).hexdigest()[:12]


def legacy_signature(track: Sequence[str]) -> str:
    """The signature of `track` before every repeated leadData entry was kept: a finished snapshot
    baseline under it still counts, since only repeated names differ."""
    return hashlib.sha256(dumps(sorted(set(track))).encode()).hexdigest()[:12]


def diff(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    old_track: Sequence[str] | None = None,
    new_track: Sequence[str] | None = None,
    *,
    legacy: bool = False,
) -> dict[str, dict[str, Any]]:
    """`{"field": {"from": old, "to": new}}` for every tracked field whose value moved.

    Only a value we knew can move: a field missing from either side (an API response without
    it, a field newly added to `track`) is learnt silently, never reported. leadData entries
    are the exception, because the whole list comes with every document: an entry that appears
    or vanishes while the lead had leadData before is a change (null on the missing side), but
    only for a name tracked both when `old` was taken (`old_track`) and now (`new_track`); a
    track of None covers every key. `legacy`: `old` kept one value of a repeated name, so the
    entries of a name that `new` holds several of are learnt, not compared.
    """
    changes: dict[str, dict[str, Any]] = {}
    had_lead_data = any(_is_lead_data(k) for k in old)
    has_lead_data = any(_is_lead_data(k) for k in new)
    repeated = {lead_data_name(k) for k in new if k.startswith(LEAD_DATA_REPEAT)} if legacy else set()
    renumbered = _renumbered(old, new)
    for key in sorted(set(old) | set(new)):
        if repeated and lead_data_name(key) in repeated:
            continue
        if renumbered and lead_data_name(key) in renumbered:
            continue
        if key in old and key in new:
            if old[key] != new[key]:
                changes[key] = {"from": old[key], "to": new[key]}
        elif (
            _is_lead_data(key)
            and had_lead_data
            and has_lead_data
            and (old_track is None or covers(old_track, key))
            and (new_track is None or covers(new_track, key))
        ):
            before, after = old.get(key), new.get(key)
            if before != after:
                changes[key] = {"from": before, "to": after}
    return changes


def _renumbered(old: Mapping[str, Any], new: Mapping[str, Any]) -> set[str | None]:
    """The repeated leadData names whose entries hold the same values as before under other keys: a
    save that replaced the collection gives every entry a new id, which changes nothing."""
    names = {lead_data_name(k) for k in (*old, *new) if k.startswith(LEAD_DATA_REPEAT)}
    if not names:
        return set()

    def values(snap: Mapping[str, Any], name: str | None) -> list[str]:
        return sorted(dumps(v) for k, v in snap.items() if lead_data_name(k) == name)

    return {name for name in names if values(old, name) == values(new, name) and _keys(old, name) != _keys(new, name)}


def _keys(snap: Mapping[str, Any], name: str | None) -> set[str]:
    return {k for k in snap if lead_data_name(k) == name}


def merge(old: Mapping[str, Any], new: Mapping[str, Any], track: Sequence[str] | None = None) -> dict[str, Any]:
    """The snapshot after reading `new`: fields the document lacked keep their last known value,
    fields no longer tracked (under `track`, when given) are forgotten."""
    lead_data_present = any(_is_lead_data(k) for k in new)
    kept = {
        k: v
        for k, v in old.items()
        if k not in new and not (lead_data_present and _is_lead_data(k)) and (track is None or covers(track, k))
    }
    return {**kept, **new}


# --- events ---------------------------------------------------------------------------------


def lead_created(lead: Mapping[str, Any], detected_at: str, *, reused: bool = False) -> Event:
    """`reused`: the id named an earlier, deleted lead, whose lead.created had the plain id."""
    lead_id = lead["id"]
    resource = f"lead:{lead_id}"
    return Event(
        id=event_id(LEAD_CREATED, resource, f"reused:{lead.get('createdTs')}" if reused else ""),
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
    place: Place = NOWHERE,
    *,
    cursor_field: str | None = "createdTs",
) -> PageCommit:
    """New leads of a page: recorded (with a snapshot when updates are on), announced when created
    after `emit_after` (and after the threshold of an unreadable entry met earlier); the cursor
    moves to the newest createdTs read, within the signpost (`cursor_field` None: it stays)."""
    commit = PageCommit.at(walk.stream, walk.now, place)
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
        again = lead_id in known and reused(known[lead_id], created_ts)
        if lead_id in known and not again:
            continue
        when = walk.now if created_ts is None else created_ts
        tracked = snapshot(lead, walk.track) if walk.updates else {}
        commit.leads.append(LeadState(lead_id, when, _str(lead.get("updatedTs")), tracked, sig))
        if when > threshold:
            event = lead_created(lead, walk.detected_at, reused=again)
            commit.events.append((event, route(event)))
    moved = next_cursor(cursor, newest_raw, walk.signpost) if cursor_field is not None else None
    if moved is not None:
        commit.cursor, commit.cursor_ts = moved
    return commit


# Offsets are whole quarters of an hour, at most 26 h apart: a server whose zone changes and that
# re-serialises stored wall-clock times moves every createdTs by such a step, while a reused id's
# lead was created at any later second.
QUARTER_HOUR = 900.0
WIDEST_ZONE_STEP = 26 * 3600.0


def reused(before: LeadState, created_ts: float | None) -> bool:
    """Whether a known id now names another lead: the server handed it out again after its lead was
    deleted (MySQL's InnoDB before 8.0 restarts its counter after the highest id left), so it was
    created after the lead the id named. A forgotten lead's tombstone is never filled in again."""
    if created_ts is None or before.track == FORGOTTEN:
        return False
    moved = created_ts - before.created_ts
    if moved < 1.0:
        return False
    return moved > WIDEST_ZONE_STEP or abs(moved - round(moved / QUARTER_HOUR) * QUARTER_HOUR) >= 0.5


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
    place: Place = NOWHERE,
    *,
    cursor_field: str | None = "updatedTs",
) -> PageCommit:
    """Changed leads of a page: each diffed against its snapshot, `lead.updated` for tracked changes,
    newly tracked fields learnt silently; leads seen for the first time are recorded as they are,
    except one the created walk met unreadable: it is decided by that entry's rule (announced when
    created after its threshold), whichever walk reads it first.

    `cursor_field` None: a walk that keeps no cursor (the re-read and the snapshot baseline).
    """
    commit = PageCommit.at(walk.stream, walk.now, place)
    sig = walk.signature
    latest: dict[int, LeadState] = {}
    for lead in members:
        lead_id = lead.get("id")
        if not isinstance(lead_id, int) or isinstance(lead_id, bool):
            continue
        before = latest.get(lead_id) or known.get(lead_id)
        if before is not None and reused(before, timestamp(lead.get("createdTs"))):
            before = None  # another lead under a reused id: its snapshot tells nothing about this one
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
        changes = diff(before.snapshot, snap, old_track, walk.track, legacy=_legacy(before, walk))
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


def _legacy(state: LeadState, walk: LeadWalk) -> bool:
    """Whether a stored snapshot was taken before every repeated leadData entry was kept."""
    if state.track is None:
        return True
    if walk.tracks is not None and state.track in walk.tracks:
        return track_signature(walk.tracks[state.track]) != state.track
    return state.track != walk.signature


def decide_campaigns(
    docs: Sequence[Mapping[str, Any]],
    known: Mapping[int, CampaignState],
    *,
    baseline: bool,
    now: float,
    detected_at: str,
    route: Route,
    existed_until: float | None = None,
) -> tuple[PageCommit, list[str]]:
    """New campaigns (`campaign.created`, except in the first read) and status transitions of a page.

    `existed_until`: in the first read, the highest campaign id when it began; one above it was
    created since (ids only grow) and is announced, also when that read stopped half-way and is
    taken up again later. Returns the commit and warnings about documents that were skipped.
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
            if not baseline or (existed_until is not None and campaign_id > existed_until):
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
