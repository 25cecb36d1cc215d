"""`send-test`: one `watcher.test` event (or a sample of another type) through the sink's real delivery path."""

from __future__ import annotations

from watcher import __version__
from watcher.clock import Clock, rfc3339
from watcher.config import SinkConfig
from watcher.delivery.policy import attempt_excerpt
from watcher.errors import DeliveryError
from watcher.events import WATCHER_TEST, Event, event_id
from watcher.sinks import build_sink


def test_event(sink: SinkConfig, now: float) -> Event:
    resource = f"sink:{sink.name}"
    return Event(
        id=event_id(WATCHER_TEST, resource, repr(now)),
        type=WATCHER_TEST,
        timestamp=rfc3339(now),
        data={"sink": sink.name},
        resource=resource,
    )


async def send_test(sink_config: SinkConfig, clock: Clock, type_: str = WATCHER_TEST) -> tuple[bool, str]:
    """Deliver a test event (or a sample of another type); return whether it was accepted and a line
    describing the answer."""
    from watcher.samples import sample_event

    event = test_event(sink_config, clock.now()) if type_ == WATCHER_TEST else sample_event(type_, clock.now())
    sink = build_sink(sink_config, clock=clock, version=__version__)
    try:
        attempt = await sink.deliver([event])
    except DeliveryError as exc:
        # The classified error: status and reason, never the receiver's body or the URL.
        return False, f"{sink_config.name}: not accepted: {exc} (event {event.id})"
    finally:
        await sink.aclose()
    # Shown as the attempt log would keep it: one line, short, secrets and personal data masked.
    answer = attempt_excerpt(attempt.response_excerpt)
    said = f", answer {answer!r}" if answer else ""
    took = f"HTTP {attempt.status}" if attempt.status is not None else "confirmed by the broker"
    took += f" in {attempt.duration:.3f}s"
    return True, f"{sink_config.name}: accepted: {took}{said} (event {event.id})"
