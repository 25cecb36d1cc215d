"""The records detection decides about: what is known of a lead or a campaign, a lead the server
cannot serialise, and everything one page of a walk changes.

`detect` builds them from what the API returned and what was known; `store` reads and writes
them. Neither module's concerns leak into the other through these: they are plain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from watcher.events import Event

FORGOTTEN = "forgotten"  # the `track` of a lead erased by `forget`: a tombstone, never filled in again


@dataclass(frozen=True)
class LeadState:
    id: int
    created_ts: float
    version: str | None  # updatedTs of the snapshot
    snapshot: dict[str, Any]
    track: str | None = None  # signature of the track list the snapshot was taken under
    last_event: str | None = None  # id of the lead's last lead.updated: the next id chains on it


@dataclass(frozen=True)
class CampaignState:
    id: int
    status: str
    transitions: int
    name: str | None = None  # shown in Slack messages about the campaign's leads
    last_event: str | None = None  # id of the last status change: the next id chains on it


@dataclass(frozen=True)
class Unreadable:
    """A lead whose every read fails: skipped by the walks, retried on a slow schedule."""

    stream: str
    lead_id: int
    first_seen: float
    next_try: float
    tries: int
    error: str | None
    emit_after: float | None = None  # created: announced once readable only if created after this


@dataclass(frozen=True)
class Unannounced:
    """Leads the created walk met unreadable and has not decided yet, with the rule each was met
    under: announced once read only if created after its threshold. Whichever walk reads one first
    decides it by that rule and settles the entry."""

    stream: str  # where the entries are kept
    thresholds: Mapping[int, float]  # lead id -> created after this: lead.created; else recorded


NOTHING_UNANNOUNCED = Unannounced("", {})


@dataclass(frozen=True)
class Place:
    """What a page's commit records besides the decision about its leads: where the walk stands and
    what on the page could not be read. The walk knows these; the decision writes them."""

    set_walk_from: bool = False  # the walk's first page (or its last): walk_from is written
    walk_from: str | None = None
    baseline_until: float | None = None
    floor: float | None = None
    label: str | None = None  # a walk that keeps no cursor: what it is taken under (written as its cursor)
    progress: int | None = None
    resume_after: int | None = None
    unreadable: tuple[tuple[int, float, str, float | None], ...] = ()  # (lead id, next try, error, emit_after)
    readable: tuple[int, ...] = ()


NOWHERE = Place()


@dataclass
class PageCommit:
    """Everything one page of a walk changes, committed together or not at all."""

    stream: str
    now: float
    cursor: str | None = None  # None keeps the stored cursor
    cursor_ts: float | None = None
    walk_from: str | None = None
    set_walk_from: bool = False  # walk_from is written only when this is true (None clears it)
    baseline_until: float | None = None  # written with walk_from
    floor: float | None = None  # written when not None
    progress: int | None = None  # written when not None (0 clears it, with resume_after)
    resume_after: int | None = None  # written with progress
    # (lead id, next try, error, emit_after) to record
    unreadable: list[tuple[int, float, str, float | None]] = field(default_factory=list)
    readable: list[int] = field(default_factory=list)  # unreadable leads read at last: forgotten
    settled: list[tuple[str, int]] = field(default_factory=list)  # (stream, lead id): entries another walk answered
    leads: list[LeadState] = field(default_factory=list)
    campaigns: list[CampaignState] = field(default_factory=list)
    events: list[tuple[Event, Sequence[str]]] = field(default_factory=list)  # (event, sink names)
    finished: bool = False  # the walk ended: record a successful poll
    note: str | None = None  # with finished: what `status` shows beside the stream (a held cursor, throttling)

    @classmethod
    def at(cls, stream: str, now: float, place: Place) -> PageCommit:
        """An empty commit that records `place`; the decision adds what it decided."""
        return cls(
            stream,
            now,
            cursor=place.label,
            walk_from=place.walk_from,
            set_walk_from=place.set_walk_from,
            baseline_until=place.baseline_until,
            floor=place.floor,
            progress=place.progress,
            resume_after=place.resume_after,
            unreadable=list(place.unreadable),
            readable=list(place.readable),
        )
