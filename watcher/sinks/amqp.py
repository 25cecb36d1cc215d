"""The AMQP 0-9-1 (RabbitMQ) sink: persistent messages with publisher confirms, published mandatory.

An attempt succeeds only on the broker's ack. A message no queue takes comes back (basic.return)
and is a failed attempt, so an unbound routing key never swallows events. The exchange is the
operator's: it is checked passively when the connection is made, never declared.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import aio_pika
import aiormq.exceptions as amqp_errors
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from pamqp.commands import Basic

from watcher.errors import DeliveryError, SinkGone
from watcher.events import Event
from watcher.sinks.broker import BrokerSink, lowered, target
from watcher.tls import client_context


@dataclass
class _Link:
    connection: AbstractConnection
    channel: AbstractChannel
    exchange: AbstractExchange


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
        routing_key = target(self.config.routing_key, event.type)
        message = aio_pika.Message(
            body,
            headers=dict(headers),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.id,
            type=event.type,
        )
        try:
            # No timeout of its own: the attempt's (deliver_each) bounds it, and one per message
            # costs a timer each.
            confirm = await link.exchange.publish(message, routing_key=routing_key, mandatory=True)
        except amqp_errors.PublishError as exc:
            reason = getattr(exc.frame, "reply_text", "") or "returned"
            raise DeliveryError(
                f"returned by the broker ({reason}): no queue bound to exchange {self.config.exchange} "
                f"takes routing key {routing_key}"
            ) from None
        except amqp_errors.DeliveryError as exc:
            raise DeliveryError(f"the broker refused the message ({getattr(exc.frame, 'name', 'nack')})") from None
        if not isinstance(confirm, Basic.Ack):
            raise DeliveryError(f"the broker did not confirm the message ({type(confirm).__name__})")
        return ""  # the ack carries nothing more to show

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
