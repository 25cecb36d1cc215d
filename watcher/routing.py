"""Which sinks an event goes to: each sink's event types, campaigns and personal-data setting."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from watcher.config import SinkConfig
from watcher.events import LEAD_UPDATED, Event
from watcher.pii import is_personal_change


def wants(sink: SinkConfig, event: Event) -> bool:
    """Whether an event goes to a sink: its type and campaign filters, and for a sink without
    personal data, a lead.updated whose every change is personal (it would arrive empty) does not.
    A sink with `enabled = false` wants nothing: queueing for it would pile up rows nothing sends."""
    if not sink.enabled or event.type not in sink.events:
        return False
    if sink.campaign_ids and event.campaign_id not in sink.campaign_ids:
        return False
    if event.type == LEAD_UPDATED and not sink.include_pii:
        changes = event.data.get("changes") or {}
        return not changes or not all(is_personal_change(str(k), v) for k, v in changes.items())
    return True


def router(sinks: Sequence[SinkConfig]) -> Callable[[Event], list[str]]:
    """The sink names each event goes to, for a fixed list of sinks."""

    def route(event: Event) -> list[str]:
        return [s.name for s in sinks if wants(s, event)]

    return route
