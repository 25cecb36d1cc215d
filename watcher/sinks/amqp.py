"""The AMQP 0-9-1 (RabbitMQ) sink: persistent messages with publisher confirms, published mandatory.

An attempt succeeds only on the broker's ack. A message no queue takes comes back (basic.return)
and is a failed attempt, so an unbound routing key never swallows events. The exchange is the
operator's: it is checked passively when the connection is made, never declared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq.exceptions as amqp_errors
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from watcher.errors import DeliveryError, SinkGone
from watcher.events import Event
from watcher.sinks.broker import BrokerSink, Item, Result, lowered, target
from watcher.tls import client_context


@dataclass
class _Link:
    connection: AbstractConnection
    channel: AbstractChannel
    exchange: AbstractExchange
    # Event ids with a message unconfirmed on the channel through _publish_each: aiormq leads a
    # basic.return to one delivery tag per message id, so a second copy must wait its turn.
    publishing: set[str] = field(default_factory=set)


class AmqpSink(BrokerSink[_Link]):
    kind = "AMQP broker"

    async def _connect(self) -> _Link:
        # Not connect_robust: its reconnect replays nothing in flight; a lost connection fails
        # its attempts (retried by the outbox under the same message_id) and is made anew here.
        tls = urlsplit(self.config.url).scheme.lower() == "amqps"
        connection = await aio_pika.connect(
            self.config.url,
            timeout=self.config.timeout,
            client_properties={"connection_name": f"convertr-watcher {self.name}"},
            # amqps: verified against what webhooks trust (certifi, SSL_CERT_FILE / _DIR).
            ssl_context=client_context() if tls else None,
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.get_exchange(self.config.exchange, ensure=True)
        except BaseException:
            # Aside: after a timeout, a close waiting on a broker that stopped answering would
            # hold the attempt past it.
            self._aside(connection.close())
            raise
        return _Link(connection, channel, exchange)

    async def _publish(self, link: _Link, event: Event, body: bytes, headers: dict[str, str]) -> str:
        done: list[Result | None] = [None]
        await self._publish_many(link, [(event, body, headers)], done)
        (answer,) = done
        if answer is None:  # pragma: no cover - _publish_many fills it or raises
            raise DeliveryError("the broker did not confirm the message")
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def _publish_many(self, link: _Link, items: Sequence[Item], done: list[Result | None]) -> None:
        """All the messages in one write (one socket send, one TCP read for the broker), then
        their confirmations as they come.

        This is what aiormq's basic_publish does for one message (the channel lock, a delivery tag
        and a confirmation future per message, the message id noted so a basic.return finds its
        future), done for the batch at once: published one by one, each message costs a task, a
        lock round, a pass of the connection's writer and a send of its own, and on a machine
        where the broker shares the CPU that is most of what the daemon spends beyond a plain
        loop. The confirmations are aiormq's own futures: an ack, a nack, a return and a closed
        channel reach them exactly as they reach basic_publish.
        """
        channel: Any = await link.channel.get_underlay_channel()
        if not _batchable(channel):
            # An aiormq whose channel no longer has these parts: the library's own path, one by one.
            await self._publish_each(link, items, done)
            return
        exchange = self.config.exchange
        each: list[list[Any]] = []  # the frames of each item
        for event, body, headers in items:
            routing_key = target(self.config.routing_key, event.type)
            properties = Basic.Properties(
                content_type="application/json",
                delivery_mode=2,  # persistent
                headers=dict(headers),
                message_id=event.id,
                message_type=event.type,
            )
            frames: list[Any] = [Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)]
            frames.append(ContentHeader(properties=properties, body_size=len(body)))
            frames += channel._split_body(body)
            each.append(frames)
        sent: list[int] = []  # the index in `items` of each message written, in tag order
        confirmations: list[asyncio.Future[Any]] = []
        async with channel.lock:
            first = channel.delivery_tag
            try:
                written: list[Any] = []
                for i, (event, _, _) in enumerate(items):
                    if event.id in channel.message_id_delivery_tag:
                        # aiormq finds a returned message's confirmation by its message_id, one tag
                        # per id: a second unconfirmed copy would take the first one's basic.return,
                        # and the first one's ack would then count an unroutable message delivered.
                        done[i] = DeliveryError("a message with the same event id is still unconfirmed on the channel")
                        continue
                    channel.delivery_tag += 1
                    tag = channel.delivery_tag
                    confirmation = channel.create_future()
                    channel.confirmations[tag] = confirmation
                    channel.message_id_delivery_tag[event.id] = tag
                    confirmations.append(confirmation)
                    sent.append(i)
                    written += each[i]
                if written:
                    await channel.write_queue.put(ChannelFrame.marshall(frames=written, channel_number=channel.number))
            except BaseException:
                # Nothing was written: the broker never saw these tags, so they are used again.
                channel.delivery_tag = first
                for n, i in enumerate(sent):
                    tag = first + 1 + n
                    channel.confirmations.pop(tag, None)
                    if channel.message_id_delivery_tag.get(items[i][0].id) == tag:
                        channel.message_id_delivery_tag.pop(items[i][0].id)
                    confirmations[n].cancel()
                raise
        for n, i in enumerate(sent):
            confirmations[n].add_done_callback(partial(_forget, channel, items[i][0].id, first + 1 + n))
        if not confirmations:
            return
        try:
            # No timeout of its own: the attempt's (deliver_each) bounds it.
            await asyncio.wait(confirmations)
        finally:
            for n, i in enumerate(sent):
                confirmation = confirmations[n]
                if not confirmation.done():
                    confirmation.cancel()  # not confirmed in time: the attempt fails for it
                    # Now, not in _forget's callback: a basic.return read before the callback runs
                    # would set its error on the cancelled future, and aiormq's channel reader
                    # dies of the InvalidStateError, taking the channel and connection with it.
                    _forget(channel, items[i][0].id, first + 1 + n, None)
                elif not confirmation.cancelled():
                    error = confirmation.exception()
                    done[i] = (
                        self._answer(confirmation.result()) if error is None else self._refused(items[i][0], error)
                    )

    async def _publish_each(self, link: _Link, items: Sequence[Item], done: list[Result | None]) -> None:
        """The messages through aio-pika's public publish, concurrently, each confirmed on its own."""

        async def one(event: Event, body: bytes, headers: dict[str, str]) -> object:
            message = aio_pika.Message(
                body,
                headers=dict(headers),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event.id,
                type=event.type,
            )
            routing_key = target(self.config.routing_key, event.type)
            return await link.exchange.publish(message, routing_key=routing_key, mandatory=True)

        async def owned(event: Event, body: bytes, headers: dict[str, str]) -> object:
            try:
                return await one(event, body, headers)
            finally:
                link.publishing.discard(event.id)

        sent: list[int] = []
        for i, (event, _, _) in enumerate(items):
            if event.id in link.publishing:
                done[i] = DeliveryError("a message with the same event id is still unconfirmed on the channel")
            else:
                link.publishing.add(event.id)
                sent.append(i)
        answers = await asyncio.gather(*(owned(*items[i]) for i in sent), return_exceptions=True)
        for i, answer in zip(sent, answers, strict=True):
            done[i] = self._refused(items[i][0], answer) if isinstance(answer, BaseException) else self._answer(answer)

    def _answer(self, confirm: object) -> Result:
        """What a settled confirmation means: an ack is the attempt's success."""
        if not isinstance(confirm, Basic.Ack):
            return DeliveryError(f"the broker did not confirm the message ({type(confirm).__name__})")
        return ""  # the ack carries nothing more to show

    def _refused(self, event: Event, exc: BaseException) -> Result:
        """The error for a confirmation that failed: returned (unroutable), nacked, or the channel's."""
        if isinstance(exc, amqp_errors.PublishError):
            reason = getattr(exc.frame, "reply_text", "") or "returned"
            return DeliveryError(
                f"returned by the broker ({reason}): no queue bound to exchange {self.config.exchange} "
                f"takes routing key {target(self.config.routing_key, event.type)}"
            )
        if isinstance(exc, amqp_errors.DeliveryError):
            return DeliveryError(f"the broker refused the message ({getattr(exc.frame, 'name', 'nack')})")
        return exc

    async def _check(self, link: _Link) -> str:
        return f"exchange {self.config.exchange} exists; publisher confirms on"

    def _alive(self, link: _Link) -> bool:
        return not link.connection.is_closed and not link.channel.is_closed

    async def _close(self, link: _Link) -> None:
        await link.connection.close()

    def _explain(self, exc: BaseException) -> DeliveryError:
        if isinstance(exc, amqp_errors.ProbableAuthenticationError | amqp_errors.AuthenticationError):
            return SinkGone(
                f"the {self.kind} refused the credentials in the sink's url (ACCESS_REFUSED): "
                "fix them, then reload or `replay --sink` the sink"
            )
        if isinstance(exc, amqp_errors.ChannelAccessRefused):
            return SinkGone(
                f"the {self.kind} refused this user access to exchange {self.config.exchange} "
                "(ACCESS_REFUSED): grant it, then `replay --sink` the sink"
            )
        if isinstance(exc, amqp_errors.ChannelNotFoundEntity):
            return DeliveryError(f"exchange {self.config.exchange} does not exist on the {self.kind}")
        if isinstance(exc, amqp_errors.ChannelInvalidStateError):
            return DeliveryError(f"the channel to the {self.kind} was closed (the connection was lost)")
        if isinstance(exc, amqp_errors.ChannelClosed):
            return DeliveryError(f"the {self.kind} closed the channel: {self._reason(exc)}")
        if isinstance(exc, amqp_errors.ConnectionClosed):
            return DeliveryError(f"the {self.kind} closed the connection: {self._reason(exc)}")
        if isinstance(exc, amqp_errors.AMQPConnectionError) and exc.args and isinstance(exc.args[0], int):
            return DeliveryError(f"cannot connect to the {self.kind}: {self._reason(exc)}")
        if isinstance(exc, ConnectionError | OSError):
            return DeliveryError(f"cannot reach the {self.kind}: {self._reason(exc)}")
        return DeliveryError(f"{self.kind}: {type(exc).__name__}: {self._reason(exc)}")

    def _reason(self, exc: BaseException) -> str:
        """The broker's or the system's words for it (AMQP reply text, strerror), redacted."""
        if isinstance(exc, OSError) and exc.strerror:
            return lowered(self.redact(exc.strerror))
        args = [a for a in getattr(exc, "args", ()) if isinstance(a, str)]
        return self.redact(args[-1] if args else type(exc).__name__)


# The parts of aiormq's channel that basic_publish itself uses, and _publish_many with it (seen in
# aiormq 7.2). Checked on each channel, so a release that reshapes them costs speed, not events.
_CHANNEL_PARTS = ("lock", "delivery_tag", "confirmations", "message_id_delivery_tag", "write_queue", "number")


def _batchable(channel: Any) -> bool:
    return (
        all(hasattr(channel, part) for part in _CHANNEL_PARTS)
        and callable(getattr(channel, "_split_body", None))
        and callable(getattr(channel, "create_future", None))
        and isinstance(getattr(channel, "confirmations", None), dict)
        and isinstance(getattr(channel, "message_id_delivery_tag", None), dict)
        and isinstance(getattr(channel, "delivery_tag", None), int)
    )


def _forget(channel: Any, message_id: str, tag: int, _: object) -> None:
    """Once a message is settled, its id no longer leads a basic.return to it (as basic_publish does)."""
    if channel.message_id_delivery_tag.get(message_id) == tag:
        channel.message_id_delivery_tag.pop(message_id)
