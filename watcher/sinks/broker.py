"""What the broker sinks (NATS JetStream, AMQP, Redis Streams) share.

A broker sink publishes the webhook body byte for byte with the Standard Webhooks headers beside
it, and an attempt counts only once the broker confirms it (a JetStream ack, an AMQP publisher
confirm, an XADD reply). One connection is kept per sink and re-made after it breaks, with a
growing pause between failed connection attempts so a broker that is down is not hammered.

Broker URLs carry passwords: no message here quotes one, and any text taken from a client
library has the URL and its password cut out first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import structlog

from watcher.clock import Clock
from watcher.config import TYPE_PLACEHOLDER, SinkConfig
from watcher.errors import ConfigError, DeliveryError
from watcher.events import Event
from watcher.signing import decode_secret, sign
from watcher.sinks.base import Attempt, render_data

# The pause after a failed connection attempt, doubling up to the cap while the broker stays away.
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 30.0
# A refused connection right after a broker restart often succeeds a moment later.
CONNECT_RETRY_WAIT = 0.2
# The most events one attempt publishes before it waits for their confirmations (pipelining): the
# engine's per-attempt cost and the broker's round trip are then paid once for all of them. The
# dispatcher only ever groups events of different resources (each the oldest pending of its own),
# so pipelining never puts two events of one lead or campaign in flight at once.
PIPELINE = 32

L = TypeVar("L")
# One message of an attempt: the event, its body, its headers.
Item = tuple[Event, bytes, dict[str, str]]
# What became of one message: the broker's answer worth logging ("" for a plain confirmation), or
# the exception that refused it.
Result = str | BaseException

log = structlog.get_logger("watcher.sinks")


def target(template: str, event_type: str) -> str:
    """A subject or routing key with the event type filled in: `convertr.{type}` -> `convertr.lead.created`."""
    return template.replace(TYPE_PLACEHOLDER, event_type)


def lowered(reason: str) -> str:
    """A system's reason as the middle of a sentence: "Connection refused" -> "connection refused";
    an acronym or code ("CONNECTION_FORCED", "[SSL: …]") stays as written."""
    return reason[:1].lower() + reason[1:] if reason[1:2].islower() else reason


def message_headers(event: Event, stamp: int, body: bytes, keys: Sequence[bytes]) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, plus `type`; a signature only when keys are set."""
    headers = {"webhook-id": event.id, "webhook-timestamp": str(stamp), "type": event.type}
    if keys:
        headers["webhook-signature"] = sign(event.id, stamp, body, keys)
    return headers


class BrokerSink(Generic[L]):
    """One kept connection (`L`, whatever the client library calls one) and the attempt around it.

    Subclasses say how to connect, publish one message and read its confirmation, whether a
    connection still works, and what a library error means (`_explain`).
    """

    max_batch = PIPELINE  # events per attempt (deliver_each); each gets its own outcome
    min_interval = 0.0
    kind = "broker"  # how errors name the other side: "NATS server", "AMQP broker", "Redis server"

    def __init__(self, config: SinkConfig, *, clock: Clock, version: str) -> None:
        self.name = config.name
        self.config = config
        self._clock = clock
        del version  # a broker message carries no User-Agent; the parameter keeps build_sink uniform
        self._keys = tuple(decode_secret(s) for s in config.secrets)
        self._link: L | None = None
        self._lock = asyncio.Lock()
        self._retry_at = float("-inf")  # monotonic: no connection attempt before this
        self._backoff = BACKOFF_FIRST
        self._down = ""  # why the last connection attempt failed
        self._down_as: type[DeliveryError] = DeliveryError  # and its class: a refusal stays final in the pause
        self._confirmed_at = float("-inf")  # monotonic: the last confirmation on any connection
        self._closing: set[asyncio.Task[None]] = set()  # dropped connections being closed (_aside)
        password = urlsplit(config.url).password or ""
        self._hide = tuple(s for s in (config.url, password) if len(s) > 1)

    # --- what each broker supplies ---------------------------------------------------------------

    async def _connect(self) -> L:
        raise NotImplementedError

    async def _publish(self, link: L, event: Event, body: bytes, headers: dict[str, str]) -> str:
        """Publish and wait for the confirmation; anything worth a line in the attempt log, else ""."""
        raise NotImplementedError

    async def _publish_many(self, link: L, items: Sequence[Item], done: list[Result | None]) -> None:
        """Publish every item, then wait for their confirmations; as each arrives, put its answer
        (see `_publish`) or the exception that refused it at its index in `done`. An index left
        empty (this raised, or ran out of time) was not confirmed.

        By default each publish runs as its own task on the one connection; a broker with a
        cheaper way (a Redis pipeline, JetStream acks read off one inbox subscription) says so.
        """
        tasks = [asyncio.ensure_future(self._publish(link, *item)) for item in items]
        try:
            if tasks:
                await asyncio.wait(tasks)
        finally:
            _collect(tasks, done)

    async def _check(self, link: L) -> str:
        """What `check --connect` shows once connected: that the destination exists."""
        raise NotImplementedError

    def _alive(self, link: L) -> bool:
        return True

    def _unanswered(self, *, connected: bool, since: float) -> DeliveryError:
        """The error for an attempt that ran out of time (`since`: when it began, monotonic)."""
        waited = "confirmation" if connected else "answer"
        during = "" if connected else " while connecting"
        return DeliveryError(f"no {waited} from the {self.kind} within {self.config.timeout:g}s{during}")

    def _lost(self, exc: BaseException) -> bool:
        """Whether this error means the connection is gone (it is then made anew)."""
        return False

    async def _close(self, link: L) -> None:
        raise NotImplementedError

    def _explain(self, exc: BaseException) -> DeliveryError:
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------

    def redact(self, text: str) -> str:
        """Library text fit for a log line: the URL and its password cut out, one line, short."""
        for secret in self._hide:
            text = text.replace(secret, "[redacted]")
        return " ".join(text.split())[:300]

    async def deliver(self, events: Sequence[Event]) -> Attempt:
        """Publish the single event and wait for the broker's confirmation, all within `timeout`."""
        if len(events) != 1:
            raise ValueError(f"deliver takes one event, got {len(events)}: deliver_each takes several")
        (result,) = await self.deliver_each(events)
        if isinstance(result, DeliveryError):
            raise result
        return result

    async def deliver_each(self, events: Sequence[Event]) -> list[Attempt | DeliveryError]:
        """Publish the events, then wait for their confirmations, all within `timeout`: for each
        event, in order, an Attempt when the broker confirmed it, else the error that kept it
        from being confirmed (an attempt never counts for an event the broker did not confirm)."""
        started = self._clock.monotonic()
        done: list[Result | None] = [None] * len(events)
        link: L | None = None
        failure: DeliveryError | None = None
        timed_out = False
        try:
            async with asyncio.timeout(self.config.timeout):
                link = await self._connected()
                stamp = int(self._clock.now())
                items = []
                sent: list[int] = []  # the index in `events` of each item
                whole = self.config.include_pii
                for i, event in enumerate(events):
                    try:
                        # The whole data: the stored envelope as it is (delivery.stored), nothing decoded.
                        body = event.body() if whole else event.body(render_data(event, self.config))
                    except DeliveryError as exc:  # its stored row no longer decodes: it alone fails
                        done[i] = exc
                        continue
                    items.append((event, body, message_headers(event, stamp, body, self._keys)))
                    sent.append(i)
                answers: list[Result | None] = [None] * len(items)
                try:
                    await self._publish_many(link, items, answers)
                finally:
                    for i, answer in zip(sent, answers, strict=True):
                        done[i] = answer
        except TimeoutError:
            timed_out = True
            failure = self._unanswered(connected=link is not None, since=started)
        except DeliveryError as exc:
            failure = exc
        except Exception as exc:
            failure = self._explain(exc)
            if link is not None and self._lost(exc):
                await self._drop(link)
                link = None
        now = self._clock.monotonic()
        results: list[Attempt | DeliveryError] = []
        lost = False
        for answer in done:
            if isinstance(answer, str):
                self._confirmed_at = now
                results.append(Attempt(status=None, duration=now - started, response_excerpt=answer))
            elif answer is None:
                results.append(failure or self._unanswered(connected=link is not None, since=started))
            else:
                lost = lost or self._lost(answer)
                results.append(answer if isinstance(answer, DeliveryError) else self._explain(answer))
        if link is not None and (lost or (timed_out and self._confirmed_at < started)):
            # A lost connection, or nothing confirmed on it since the attempt began (a broker that
            # stopped answering without the connection noticing): make a new one.
            await self._drop(link)
        return results

    async def reach(self) -> str:
        """`check --connect` and the start-up check (sinks.base.Reachable): connect (the broker's
        own handshake, credentials included) and check the destination exists, without
        publishing; a line saying what was found, or DeliveryError."""
        try:
            async with asyncio.timeout(self.config.timeout):
                return await self._check(await self._connected())
        except TimeoutError:
            raise DeliveryError(f"no answer from the {self.kind} within {self.config.timeout:g}s") from None
        except DeliveryError:
            raise
        except Exception as exc:
            raise self._explain(exc) from None

    async def _connected(self) -> L:
        """The kept connection, or a new one; fails at once while the last failure's pause runs."""
        async with self._lock:
            link = self._link
            if link is not None and self._alive(link):
                return link
            if link is not None:
                self._link = None
                await self._quietly_close(link)
            now = self._clock.monotonic()
            if now < self._retry_at:
                raise self._down_as(f"{self._down}; next connection attempt in {self._retry_at - now:.1f}s")
            try:
                link = await self._connect()
            except BaseException as exc:
                # Cancelled too (a broker that accepts and never answers): the pause applies all the same.
                self._retry_at = now + self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_CAP)
                error = (
                    DeliveryError(f"no answer from the {self.kind} while connecting")
                    if isinstance(exc, asyncio.CancelledError | TimeoutError)
                    else exc
                    if isinstance(exc, DeliveryError)
                    else self._explain(exc)
                )
                self._down, self._down_as = str(error), type(error)
                if isinstance(exc, Exception):
                    raise error from None
                raise
            self._backoff = BACKOFF_FIRST
            self._retry_at = float("-inf")
            self._link = link
            return link

    async def _drop(self, link: L) -> None:
        """Forget a dead connection now and close it aside: a polite close (AMQP waits for close-ok)
        on a broker that stopped answering would hold the attempt past its timeout."""
        if self._link is link:
            self._link = None
        self._aside(self._close(link))

    def _aside(self, close: Coroutine[Any, Any, object]) -> None:
        """Run a close in the background, bounded, its failure ignored; aclose() waits for it."""

        async def quietly() -> None:
            try:
                async with asyncio.timeout(1.0):
                    await close
            except Exception:  # closing a broken connection may fail in any way; it is gone either way
                pass

        closing = asyncio.create_task(quietly())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _quietly_close(self, link: L) -> None:
        try:
            async with asyncio.timeout(1.0):
                await self._close(link)
        except Exception:  # closing a broken connection may fail in any way; it is gone either way
            pass

    async def aclose(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await self._quietly_close(link)
        await asyncio.gather(*self._closing)  # each bounded (_aside)


def _collect(futures: Sequence[asyncio.Future[str]], done: list[Result | None]) -> None:
    """Put each finished future's answer or error in `done`; cancel the rest (not confirmed)."""
    for i, future in enumerate(futures):
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            done[i] = future.exception() or future.result()


def broker_sink(config: SinkConfig, *, clock: Clock, version: str) -> BrokerSink[Any]:
    """The sink for a broker type, its client library imported only now (each is an optional extra)."""
    try:
        if config.type == "nats":
            from watcher.sinks.nats import NatsSink

            return NatsSink(config, clock=clock, version=version)
        if config.type == "amqp":
            from watcher.sinks.amqp import AmqpSink

            return AmqpSink(config, clock=clock, version=version)
        if config.type == "redis":
            from watcher.sinks.redis import RedisSink

            return RedisSink(config, clock=clock, version=version)
    except ImportError as exc:
        # The configuration check found the package, but it does not import (a broken install).
        raise ConfigError(
            f"sinks.{config.name}.type",
            f'"{config.type}" sinks need the [{config.type}] extra, which does not import ({exc.name or exc}): '
            f'pip install "convertr-watcher[{config.type}]"',
        ) from None
    raise ValueError(f"not a broker sink type: {config.type!r}")


async def probe_at_start(sinks: Sequence[object]) -> None:
    """At start-up, say at once (not at the first event) when a broker sink cannot deliver: its
    broker refuses or is away, its stream or exchange is missing. Each probe is bounded by its
    sink's timeout and runs beside the others, so a hung broker holds up nothing."""

    async def one(sink: BrokerSink[Any]) -> None:
        try:
            found = await sink.reach()
        except DeliveryError as exc:
            log.error("broker sink cannot deliver yet; its events wait and are retried", sink=sink.name, error=str(exc))
        else:
            log.info("broker sink ready", sink=sink.name, found=found)

    await asyncio.gather(*(one(s) for s in sinks if isinstance(s, BrokerSink) and s.config.enabled))
