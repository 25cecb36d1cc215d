"""Where events go: the Sink protocol, the attempt record, and the HTTP plumbing sinks share.

A sink turns one attempt into either an `Attempt` (the receiver has the events) or one of the
delivery errors (`DeliveryError`, `Throttled`, `SinkGone`); the outbox decides what happens next.
Sink URLs may themselves be secrets (Slack hooks are), so nothing here ever puts a URL, or
anything derived from one, into a message or an excerpt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from watcher.bodies import Answer
from watcher.clock import Clock
from watcher.config import SinkConfig
from watcher.errors import DeliveryError
from watcher.events import Event
from watcher.pii import strip_pii
from watcher.schedule import retry_after_seconds
from watcher.sinks.transport import Transport, TransportFailure, transport_for

EXCERPT_LIMIT = 512
# The most of a receiver's answer ever read (decoded): enough for the excerpt's characters in
# UTF-8. The rest is never read, so a huge or compressed answer costs nothing.
EXCERPT_BYTES = 4 * EXCERPT_LIMIT
# A refused connection right after a receiver restart often succeeds a moment later; anything
# longer than this blip is the outbox's job, on the sink's schedule.
CONNECT_RETRY_WAIT = 0.2
# The longest wait a receiver's Retry-After is passed on as; the outbox clamps it further against
# the sink's schedule (see schedule.next_attempt_at).
RECEIVER_RETRY_AFTER_CAP = 86_400.0


# The watcher's own record of campaign names by id, as last read (Store.campaign_names in the daemon).
CampaignNames = Callable[[], Mapping[int, str]]


@dataclass(frozen=True)
class Attempt:
    """What one successful delivery attempt looked like. The attempt log keeps its status and the
    start of its answer (delivery.policy.attempt_excerpt); a failed attempt's answer rides on its
    DeliveryError.excerpt instead."""

    status: int | None
    duration: float
    # At most EXCERPT_LIMIT characters, with the sink URL redacted. Read longer than anyone shows it
    # (send-test and the attempt log, delivery.policy.ATTEMPT_EXCERPT_CHARS), so masking comes before the cut.
    response_excerpt: str


class Sink(Protocol):
    name: str
    config: SinkConfig
    max_batch: int  # events per deliver() call: 1 for webhooks, more for a Slack digest
    min_interval: float  # seconds to leave between two sends to this sink

    async def deliver(self, events: Sequence[Event]) -> Attempt:
        """Send the events once; raise DeliveryError, Throttled or SinkGone on failure."""
        ...

    async def aclose(self) -> None: ...


def render_data(event: Event, config: SinkConfig) -> Mapping[str, Any]:
    """The `data` this sink may see: personal fields removed unless `include_pii`."""
    return event.data if config.include_pii else strip_pii(event.data)


def build_sink(
    config: SinkConfig,
    *,
    clock: Clock,
    version: str,
    campaign_names: CampaignNames | None = None,
) -> Sink:
    """The sink for `config.type`.

    `campaign_names` (campaign id -> name, as the watcher last read them) is for sinks that show a
    lead's campaign to people by name (Slack); a webhook sends the lead as the API wrote it.
    """
    # Imported here: both sink modules import this one for Attempt and the HTTP helpers.
    if config.type == "webhook":
        from watcher.sinks.webhook import WebhookSink

        return WebhookSink(config, clock=clock, version=version)
    if config.type == "slack":
        from watcher.sinks.slack import SlackSink

        return SlackSink(config, clock=clock, version=version, campaign_names=campaign_names)
    raise ValueError(f"unknown sink type {config.type!r}")


def asked_wait(response: Answer, now: float) -> float | None:
    """The seconds from `now` a receiver's Retry-After asks for, at most RECEIVER_RETRY_AFTER_CAP."""
    return retry_after_seconds(response.headers.get("retry-after"), now, RECEIVER_RETRY_AFTER_CAP)


def excerpt(text: str, secret_url: str, limit: int = EXCERPT_LIMIT) -> str:
    """A response body fit for the attempt log: the URL and its parts redacted, at most `limit` chars."""
    if not text:
        return ""  # the usual answer (204, or 200 with no body): nothing to parse the URL for
    needles = [secret_url]
    try:
        url = httpx.URL(secret_url)
        needles += [url.raw_path.decode("ascii", "replace"), url.path, url.query.decode("ascii", "replace")]
    except httpx.InvalidURL:
        pass
    redacted = text
    # Longest first, so the full URL is replaced before its parts; "/" alone is not worth hiding.
    for needle in sorted({n for n in needles if len(n) > 1}, key=len, reverse=True):
        redacted = redacted.replace(needle, "[redacted]")
    return redacted if len(redacted) <= limit else redacted[: limit - 1] + "…"


def _seconds(value: float) -> str:
    return f"{value:g}s"


async def post(
    transport: Transport,
    *,
    build: Callable[[], tuple[bytes, dict[str, str]]],
    timeout: float,
    clock: Clock,
) -> tuple[Answer, float]:
    """POST `build()` -> (body, headers); (answer, seconds taken) or DeliveryError(status=None).

    `build` is called per try so each try carries its own timestamp and signature. Only the
    first EXCERPT_BYTES of the answer are read, and it is asked for uncompressed.
    """
    started = clock.monotonic()
    try:
        try:
            answer = await _exchange_once(transport, build, timeout)
        except TransportFailure as exc:
            if not exc.connecting:
                raise
            # One quick second try, written out rather than a retry policy built per request:
            # this is the hot path of every delivery, and anything longer is the outbox's job.
            await clock.sleep(CONNECT_RETRY_WAIT)
            answer = await _exchange_once(transport, build, timeout)
    except TimeoutError:
        raise DeliveryError(f"timed out after {_seconds(timeout)}") from None
    except TransportFailure as exc:
        raise DeliveryError(str(exc)) from None
    return answer, clock.monotonic() - started


async def _exchange_once(
    transport: Transport, build: Callable[[], tuple[bytes, dict[str, str]]], timeout: float
) -> Answer:
    body, headers = build()
    # The whole exchange is bounded, not each read: a trickling receiver must not hold a slot.
    async with asyncio.timeout(timeout):
        return await transport.post(body, {**headers, "accept-encoding": "identity"}, EXCERPT_BYTES)


class HttpSink:
    """What every sink shares: its configuration, a transport of its own (kept connections to its
    receiver), and the exchange of one request for an Attempt or a DeliveryError."""

    def __init__(self, config: SinkConfig, *, clock: Clock) -> None:
        self.name = config.name
        self.config = config
        self._clock = clock
        self._transport = transport_for(config.url, clock.monotonic)

    async def _exchange(
        self,
        build: Callable[[], tuple[bytes, dict[str, str]]],
        classify: Callable[..., DeliveryError | None],
    ) -> Attempt:
        """POST `build()`; a 2xx is an Attempt, anything else the DeliveryError `classify` names."""
        response, duration = await post(self._transport, build=build, timeout=self.config.timeout, clock=self._clock)
        error = classify(response, now=self._clock.now())
        if error is not None:
            error.excerpt = excerpt(response.text, self.config.url)
            raise error
        return Attempt(
            status=response.status_code,
            duration=duration,
            response_excerpt=excerpt(response.text, self.config.url),
        )

    async def aclose(self) -> None:
        await self._transport.aclose()
