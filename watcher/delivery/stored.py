"""Events read back from the outbox for an attempt, their JSON decoded only if something reads it.

The outbox keeps each event's envelope (`{"type", "timestamp", "data"}`) as the exact text that
is signed and sent (`events.dumps`). A sink that sends the event's whole data (`include_pii`,
the broker sinks' and webhooks' default) asks for `body()` and gets that text back as it is: no
decoding of the lead into dicts and encoding it again, which is a good part of what a pipelined
broker attempt costs per event. Anything that reads `timestamp` or `data` (a sink stripping
personal fields, Slack's formatting, a comparison) decodes it then, once, and sees the same Event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from watcher.errors import DeliveryError
from watcher.events import Event, loads
from watcher.state.records import Due

_LAZY = frozenset({"timestamp", "data"})
_FIELDS = tuple(f.name for f in fields(Event))


class StoredEvent(Event):
    """An Event whose `timestamp` and `data` stay undecoded in `_payload` until first read."""

    _payload: str

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the two fields not decoded yet.
        if name not in _LAZY or "_payload" not in self.__dict__:
            raise AttributeError(name)
        try:
            envelope = loads(self._payload)
            timestamp, data = envelope["timestamp"], envelope["data"]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            # A damaged row: this event's attempt fails with it (a broker batch sends the rest).
            raise DeliveryError(
                f"event {self.id} cannot be read back from the state ({type(exc).__name__}): the stored row is damaged"
            ) from None
        self.__dict__.update(timestamp=timestamp, data=data)
        return self.__dict__[name]

    def __eq__(self, other: object) -> bool:
        # Equal to the Event it was read back as, as a plain Event would be (the dataclass's own
        # __eq__ wants the same class on both sides).
        if not isinstance(other, Event):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _FIELDS)

    __hash__ = Event.__hash__

    def body(self, data: Mapping[str, Any] | None = None) -> bytes:
        if data is None and "_payload" in self.__dict__:
            return self._payload.encode()  # the stored envelope is the body, byte for byte
        return super().body(data)


def stored_event(due: Due) -> Event:
    """The event of a due delivery (see the module's docstring)."""
    event = object.__new__(StoredEvent)
    # Past the frozen dataclass's __setattr__, as its own __init__ does; the two lazy fields are left unset.
    event.__dict__.update(
        id=due.event_id,
        type=due.type,
        resource=due.resource,
        campaign_id=due.campaign_id,
        extra={},
        _payload=due.payload,
    )
    return event
