"""The change events the daemon emits: their types, ids and wire bodies.

An event id is derived from what changed (type, resource and the version that distinguishes
this change), never from when it was seen, so a re-read, a restart or a crash before commit
yields the same id, and two different changes never share one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

LEAD_CREATED = "lead.created"
LEAD_UPDATED = "lead.updated"
CAMPAIGN_CREATED = "campaign.created"
CAMPAIGN_STATUS_CHANGED = "campaign.status_changed"
WATCHER_TEST = "watcher.test"

EVENT_TYPES: tuple[str, ...] = (
    LEAD_CREATED,
    LEAD_UPDATED,
    CAMPAIGN_CREATED,
    CAMPAIGN_STATUS_CHANGED,
    WATCHER_TEST,
)


LEAD_DATA = "leadData."  # a `changes` key for a leadData entry: leadData.<name>
LEAD_DATA_REPEAT = "leadData#"  # one of several entries of a name: leadData#<entry id>.<name>


def lead_data_key(name: str, repeat: int | None = None) -> str:
    """The `changes` key of a leadData entry; `repeat` tells apart the further entries of a name that
    occurs more than once (the first keeps the plain key)."""
    return LEAD_DATA + name if repeat is None else f"{LEAD_DATA_REPEAT}{repeat}.{name}"


def lead_data_name(key: str) -> str | None:
    """The entry name a `changes` key of a leadData entry holds, or None for any other key."""
    if key.startswith(LEAD_DATA):
        return key[len(LEAD_DATA) :]
    if key.startswith(LEAD_DATA_REPEAT):
        number, dot, name = key[len(LEAD_DATA_REPEAT) :].partition(".")
        if dot and number.isdigit():
            return name
    return None


def event_id(type_: str, resource: str, version: str) -> str:
    """`evt_` and 32 hex digits (128 bits) of SHA-256 over the change's identity."""
    return "evt_" + hashlib.sha256(f"{type_}\x1f{resource}\x1f{version}".encode()).hexdigest()[:32]


def dumps(value: Any) -> str:
    """Compact, key-order-preserving JSON: the exact text that gets signed and sent."""
    return encode(value).decode()


def encode(value: Any) -> bytes:
    """`dumps` as UTF-8 bytes. orjson writes the same compact JSON as the standard library, several
    times faster; integers beyond 64 bits (which it refuses) fall back to the standard library."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def loads(text: str | bytes) -> Any:
    return orjson.loads(text)


@dataclass(frozen=True)
class Event:
    """One detected change, as stored in the outbox and sent to sinks."""

    id: str
    type: str
    timestamp: str  # RFC 3339 UTC time of detection
    data: Mapping[str, Any]
    resource: str  # "lead:123", "campaign:601", "sink:crm": ordering is kept per resource
    campaign_id: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def envelope(self, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {"type": self.type, "timestamp": self.timestamp, "data": self.data if data is None else data}

    def body(self, data: Mapping[str, Any] | None = None) -> bytes:
        """The request body: `{"type", "timestamp", "data"}` as compact UTF-8 JSON."""
        return encode(self.envelope(data))


def campaign_id_of(iri_or_doc: object) -> int | None:
    """The campaign id from a lead's `campaign` IRI (`/api/v4/campaigns/601`) or an embedded document."""
    if isinstance(iri_or_doc, Mapping):
        raw = iri_or_doc.get("id")
        return raw if isinstance(raw, int) else None
    if isinstance(iri_or_doc, str):
        tail = iri_or_doc.rstrip("/").rsplit("/", 1)[-1]
        return int(tail) if tail.isdigit() else None
    return None
