"""The Redis Streams sink: XADD to `stream`, the body in the field `body`, the headers as fields.

The XADD reply (the entry's id) is the confirmation. The client's own retries are off: it would
re-send an XADD whose reply was lost, and the outbox already retries, with the same `webhook-id`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import certifi
import redis.asyncio as aredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.typing import EncodableT, FieldT

from watcher.errors import DeliveryError, SinkGone
from watcher.sinks.broker import BrokerSink, Item, Result, lowered


def _trust(url: str) -> dict[str, Any]:
    """For rediss://, the CAs webhooks trust: SSL_CERT_FILE / SSL_CERT_DIR when set, else certifi's
    bundle (redis-py takes paths, not a context)."""
    if urlsplit(url).scheme.lower() != "rediss":
        return {}
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return {
            key: value
            for key, value in (
                ("ssl_ca_certs", os.environ.get("SSL_CERT_FILE", "")),
                ("ssl_ca_path", os.environ.get("SSL_CERT_DIR", "")),
            )
            if value
        }
    return {"ssl_ca_certs": certifi.where()}


class RedisSink(BrokerSink["aredis.Redis"]):
    kind = "Redis server"

    async def _connect(self) -> aredis.Redis:
        client = aredis.Redis.from_url(
            self.config.url,
            **_trust(self.config.url),
            socket_timeout=self.config.timeout,
            socket_connect_timeout=min(self.config.timeout, 5.0),
            retry=Retry(NoBackoff(), 0),
        )
        try:
            await client.ping()  # the handshake (AUTH, SELECT) now, so refused credentials show at once
        except BaseException:
            await client.aclose()
            raise
        return client

    async def _publish_many(self, link: aredis.Redis, items: Sequence[Item], done: list[Result | None]) -> None:
        # One pipeline, no transaction: the XADDs go out together and each has its own reply, so
        # one refused entry fails only its own event. A connection lost meanwhile fails them all
        # (their replies are lost; the outbox sends them again, same webhook-id).
        async with link.pipeline(transaction=False) as pipe:
            for _event, body, headers in items:
                fields: dict[FieldT, EncodableT] = {"body": body}
                fields.update(headers)
                pipe.xadd(self.config.stream, fields, maxlen=self.config.maxlen, approximate=True)
            replies = await pipe.execute(raise_on_error=False)
        for i, reply in enumerate(replies):
            # The entry id is the broker's business; the event's webhook-id finds the entry.
            done[i] = reply if isinstance(reply, Exception) else ""

    async def _check(self, link: aredis.Redis) -> str:
        kind = await link.type(self.config.stream)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind == "none":
            return f"stream {self.config.stream} does not exist yet: the first event creates it"
        if kind != "stream":
            raise DeliveryError(f"key {self.config.stream} holds a {kind}, not a stream")
        return f"stream {self.config.stream} exists ({await link.xlen(self.config.stream)} entries)"

    def _lost(self, exc: BaseException) -> bool:
        # After a protocol error (an entry over proto-max-bulk-len) the server closes the connection.
        return isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError) or (
            isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("Protocol error")
        )

    async def _close(self, link: aredis.Redis) -> None:
        await link.aclose()

    def _explain(self, exc: BaseException) -> DeliveryError:
        text = self.redact(str(exc))
        if isinstance(exc, redis_errors.NoPermissionError):
            # An ACL user without XADD on the key (or PING): as final as a wrong password.
            return SinkGone(f"the {self.kind} refused this user a command ({text}): grant it, then `replay --sink`")
        if isinstance(exc, redis_errors.AuthenticationError | redis_errors.AuthenticationWrongNumberOfArgsError):
            return SinkGone(
                f"the {self.kind} refused the credentials in the sink's url ({text}): "
                "fix them, then reload or `replay --sink` the sink"
            )
        if isinstance(exc, redis_errors.ResponseError):
            if text.startswith("WRONGTYPE"):
                return DeliveryError(f"key {self.config.stream} holds something other than a stream")
            if "invalid bulk length" in text:
                return DeliveryError(
                    f"the {self.kind} refused the entry ({text}): its body is over the server's proto-max-bulk-len"
                )
            return DeliveryError(f"the {self.kind} refused the entry: {text}")
        if isinstance(exc, redis_errors.TimeoutError):
            return DeliveryError(f"no reply from the {self.kind} within {self.config.timeout:g}s")
        if isinstance(exc, redis_errors.ConnectionError):
            return DeliveryError(f"cannot reach the {self.kind}: {text}")
        if isinstance(exc, OSError):
            return DeliveryError(f"cannot reach the {self.kind}: {lowered(self.redact(exc.strerror or text))}")
        return DeliveryError(f"{self.kind}: {type(exc).__name__}: {text}")
