"""The NATS JetStream sink: publish to `subject` and wait for the stream's acknowledgement.

`Nats-Msg-Id` is the event id, so a resend inside the stream's duplicate window (two minutes by
default) is stored once. The stream is the operator's: a subject no stream stores is a failed
attempt that says so, never a publish into nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from watcher.errors import DeliveryError, SinkGone
from watcher.sinks.broker import CONNECT_RETRY_WAIT, BrokerSink, Item, Result, lowered, target
from watcher.tls import client_context


def _header_block_size(headers: dict[str, str]) -> int:
    """The bytes an HPUB spends on these headers ("NATS/1.0", a line each, a blank line), as nats-py writes them."""
    return len(b"NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items())


@dataclass
class _Link:
    client: Client
    js: JetStreamContext


def _answer(ack: PubAck) -> str:
    """What the attempt log keeps of an ack: only what an operator needs to see. A routine ack
    leaves the answer empty, which also spares every delivery the log's masking pass."""
    return f"a duplicate: stream {ack.stream} already had this id (seq {ack.seq})" if ack.duplicate else ""


class NatsSink(BrokerSink[_Link]):
    kind = "NATS server"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # What the server last said out of band, and when (monotonic): a permissions violation
        # comes this way, and the publish that caused it only times out.
        self._said = ""
        self._said_at = float("-inf")

    async def _connect(self) -> _Link:
        failures: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            failures.append(exc)
            self._said, self._said_at = self.redact(str(exc)), self._clock.monotonic()

        async def quiet() -> None:
            return None

        try:
            # Two quick tries (a restarting server), then the sink's own backoff; nats-py's
            # reconnect loop stays off: a broken connection fails its attempts and is made anew.
            client = await nats.connect(
                self.config.url,
                name=f"convertr-watcher {self.name}",
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=CONNECT_RETRY_WAIT,
                connect_timeout=min(self.config.timeout, 5.0),
                # Used when the server requires TLS (tls:// or its INFO says so): the process's
                # verifying context, trusting what webhooks trust (certifi, SSL_CERT_FILE / _DIR).
                tls=client_context(),
                error_cb=on_error,
                disconnected_cb=quiet,
                closed_cb=quiet,
            )
        except nats.errors.NoServersError:
            raise failures[-1] if failures else DeliveryError(f"cannot connect to the {self.kind}") from None
        return _Link(client, client.jetstream(timeout=self.config.timeout))

    async def _publish_many(self, link: _Link, items: Sequence[Item], done: list[Result | None]) -> None:
        # JetStream's async publish: every message goes out at once, each with its own reply
        # inbox, and each ack (or refusal) settles its own future; awaited together, not in turn.
        acks: list[tuple[int, asyncio.Future[PubAck], str]] = []
        limit = link.client.max_payload
        try:
            for i, (event, body, headers) in enumerate(items):
                subject = target(self.config.subject, event.type)
                headers = {"Nats-Msg-Id": event.id, **headers}
                size = len(body) + _header_block_size(headers)
                if size > limit:
                    # The server counts headers and body against max_payload and drops the
                    # connection (with every publish awaiting its ack) on a larger message; nats-py
                    # checks the body alone.
                    done[i] = DeliveryError(
                        f"the message ({size} bytes with its headers) is over the {self.kind}'s max_payload "
                        f"({limit} bytes): raise the server's max_payload; the event is retried on its schedule"
                    )
                    continue
                ack = await link.js.publish_async(subject, body, headers=headers)
                acks.append((i, ack, subject))
            if acks:
                await asyncio.wait([ack for _, ack, _ in acks])
        finally:
            for i, ack, subject in acks:
                if not ack.done():
                    ack.cancel()  # not confirmed in time: its place among the client's pending acks is freed
                elif ack.cancelled():
                    pass
                elif isinstance(ack.exception(), nats.js.errors.NoStreamResponseError):
                    done[i] = DeliveryError(f"no JetStream stream stores subject {subject}")
                else:
                    done[i] = ack.exception() or _answer(ack.result())

    async def _check(self, link: _Link) -> str:
        subjects = sorted({target(self.config.subject, t) for t in self.config.events})
        streams: set[str] = set()
        for subject in subjects:
            try:
                streams.add(await link.js.find_stream_name_by_subject(subject))
            except nats.js.errors.NotFoundError:
                raise DeliveryError(f"no JetStream stream stores subject {subject}") from None
        return f"JetStream stream {', '.join(sorted(streams))} stores {', '.join(subjects)}"

    def _unanswered(self, *, connected: bool, since: float) -> DeliveryError:
        said = self._said if self._said_at >= since else ""
        if "permissions violation" in said.lower():
            # The server refused this user the subject: no retry can help until someone grants it.
            return SinkGone(
                f"the {self.kind} refused to let this user publish ({said}): grant it, then `replay --sink`"
            )
        error = super()._unanswered(connected=connected, since=since)
        return DeliveryError(f"{error} (the server said: {said})") if said else error

    def _alive(self, link: _Link) -> bool:
        return bool(link.client.is_connected)

    async def _close(self, link: _Link) -> None:
        await link.client.close()

    def _explain(self, exc: BaseException) -> DeliveryError:
        text = self.redact(str(exc))
        if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in text.lower():
            return SinkGone(
                f"the {self.kind} refused the credentials in the sink's url (Authorization Violation): "
                "fix them, then reload or `replay --sink` the sink"
            )
        if isinstance(exc, nats.js.errors.APIError):
            return DeliveryError(f"JetStream refused the message: {exc.description} (error {exc.err_code})")
        if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.StaleConnectionError):
            return DeliveryError(f"the connection to the {self.kind} was lost")
        if isinstance(exc, OSError):
            return DeliveryError(f"cannot connect to the {self.kind}: {lowered(self.redact(exc.strerror or text))}")
        return DeliveryError(f"{self.kind}: {type(exc).__name__}: {text}")
