"""The Standard Webhooks sink: one signed POST per event, classified by the answer's status."""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from watcher.bodies import Answer
from watcher.clock import Clock
from watcher.config import SinkConfig
from watcher.errors import DeliveryError, SinkGone, Throttled
from watcher.events import Event
from watcher.signing import decode_secret, webhook_headers
from watcher.sinks.base import Attempt, HttpSink, asked_wait, render_data


def classify(response: Answer, *, now: float) -> DeliveryError | None:
    """None for a 2xx; otherwise the error the outbox should see (Standard Webhooks status rules)."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    retry_after = asked_wait(response, now)
    # The receiver's body stays out of the message: it may echo the payload's personal data back,
    # and these messages end up in logs and the attempt log.
    what = f"HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip()
    if 300 <= status < 400:
        # The Location is not quoted: it may carry the same secrets as the configured URL.
        return DeliveryError(f"{what}: redirects are not followed; update the sink URL", status=status)
    if status == 410:
        return SinkGone(f"{what}: the receiver has gone away", status=status)
    if status == 429 or (status == 503 and retry_after is not None):
        return Throttled(what, status=status, retry_after=retry_after)
    return DeliveryError(what, status=status, retry_after=retry_after)


class WebhookSink(HttpSink):
    """POSTs one event at a time, signed with every configured key."""

    max_batch = 1
    min_interval = 0.0

    def __init__(self, config: SinkConfig, *, clock: Clock, version: str) -> None:
        super().__init__(config, clock=clock)
        self._version = version
        self._keys = tuple(decode_secret(s) for s in config.secrets)

    async def deliver(self, events: Sequence[Event]) -> Attempt:
        """POST the single event; the body is rendered once and signed exactly as sent."""
        if len(events) != 1:
            raise ValueError(f"a webhook sink delivers one event at a time, got {len(events)}")
        event = events[0]
        # The whole data: the stored envelope as it is (delivery.stored), nothing decoded.
        body = event.body() if self.config.include_pii else event.body(render_data(event, self.config))

        def build() -> tuple[bytes, dict[str, str]]:
            # The timestamp is per attempt (the spec's replay window), the id and body are not.
            stamp = int(self._clock.now())
            return body, webhook_headers(event.id, stamp, body, self._keys, self._version)

        return await self._exchange(build, classify)
