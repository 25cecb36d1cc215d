"""The NATS JetStream sink: publish to `subject` and wait for the stream's acknowledgement.

`Nats-Msg-Id` is the event id, so a resend inside the stream's duplicate window (two minutes by
default) is stored once. The stream is the operator's: a subject no stream stores is a failed
attempt that says so, never a publish into nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header, PubAck

from watcher.errors import DeliveryError, SinkGone
from watcher.sinks.broker import CONNECT_RETRY_WAIT, BrokerSink, Item, Result, lowered, target
from watcher.tls import client_context


def _header_block_size(headers: dict[str, str]) -> int:
    """The bytes an HPUB spends on these headers ("NATS/1.0", a line each, a blank line), as nats-py writes them."""
    return len(b"NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items())


# The status header of the server's own answer to a publish nothing subscribes to: no stream stores it.
NO_RESPONDERS = "503"


class _Batch:
    """One attempt's messages awaiting the stream's answers: each reply lands at its index, and
    `finished` settles once every message has one."""

    __slots__ = ("answers", "finished", "left")

    def __init__(self, size: int) -> None:
        self.answers: list[Msg | None] = [None] * size
        self.left = 1  # one for the sending itself: replies that come while it goes on cannot finish the batch
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()


@dataclass
class _Link:
    client: Client
    js: JetStreamContext
    # Replies come to `inbox` + a number on one wildcard subscription, each routed by its subject to
    # its attempt's batch and index: no future, task or random token per message (publish_async's
    # semaphore, future and token_hex cost the sink about as much as the publish itself).
    inbox: str = ""
    waiting: dict[str, tuple[_Batch, int]] = field(default_factory=dict)
    numbers: itertools.count[int] = field(default_factory=itertools.count)

    async def on_reply(self, msg: Msg) -> None:
        entry = self.waiting.pop(msg.subject, None)
        if entry is None:  # its attempt gave up on it (timed out): too late to count
            return
        batch, i = entry
        batch.answers[i] = msg
        batch.left -= 1
        if batch.left == 0 and not batch.finished.done():
            batch.finished.set_result(None)

    def closed(self) -> None:
        """The connection is gone, and with it every reply still to come: the batches waiting for
        one end now as a lost connection instead of waiting out their attempts' timeouts."""
        for batch, _ in self.waiting.values():
            if not batch.finished.done():
                batch.finished.set_exception(nats.errors.ConnectionClosedError())
        self.waiting.clear()


def _answer(ack: PubAck) -> str:
    """What the attempt log keeps of an ack: only what an operator needs to see. A routine ack
    leaves the answer empty, which also spares every delivery the log's masking pass."""
    return f"a duplicate: stream {ack.stream} already had this id (seq {ack.seq})" if ack.duplicate else ""


def _read_ack(msg: Msg, subject: str) -> Result:
    """What the stream answered to one publish, read as nats-py's JetStream publish reads it."""
    if msg.headers and msg.headers.get(Header.STATUS) == NO_RESPONDERS:
        return DeliveryError(f"no JetStream stream stores subject {subject}")
    try:
        reply = json.loads(msg.data)
        if "error" in reply:
            # from_error raises the error (a subclass by code) rather than returning it.
            try:
                nats.js.errors.APIError.from_error(reply["error"])
            except nats.js.errors.APIError as refused:
                return refused
        if "stream" in reply and "seq" in reply and not reply.get("duplicate"):
            return ""  # a routine ack (nearly all of them): the PubAck nats-py would build says nothing more
        return _answer(PubAck.from_response(reply))
    except Exception as exc:  # not a JetStream answer at all (something else replied on the subject)
        return DeliveryError(f"the {NatsSink.kind} answered with no JetStream acknowledgement: {exc}")


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

        made: list[_Link] = []

        async def closed() -> None:
            for link in made:
                link.closed()

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
                closed_cb=closed,
            )
        except nats.errors.NoServersError:
            raise failures[-1] if failures else DeliveryError(f"cannot connect to the {self.kind}") from None
        link = _Link(client, client.jetstream(timeout=self.config.timeout), inbox=client.new_inbox() + ".")
        made.append(link)
        try:
            await client.subscribe(link.inbox + "*", cb=link.on_reply)
        except BaseException:
            await self._quietly_close(link)
            raise
        return link

    async def _publish_many(self, link: _Link, items: Sequence[Item], done: list[Result | None]) -> None:
        # Every message goes out at once (nats-py writes them in one flush), each with its own
        # reply subject; the acks (or refusals) come back on the link's inbox and are read once
        # all are in, or the attempt's timeout cancels the wait.
        batch = _Batch(len(items))
        subjects: list[str | None] = [None] * len(items)  # the reply subject of each message sent
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
                reply = f"{link.inbox}{next(link.numbers)}"
                link.waiting[reply] = (batch, i)
                subjects[i] = reply
                batch.left += 1
                await link.client.publish(subject, body, reply=reply, headers=headers)
            batch.left -= 1
            if batch.left:
                await batch.finished
        finally:
            if batch.finished.done() and not batch.finished.cancelled():
                batch.finished.exception()  # seen: a close while still sending ends the attempt by its own error
            for i, sent in enumerate(subjects):
                if sent is None:
                    continue
                link.waiting.pop(sent, None)  # not answered in time: a late ack is ignored
                msg = batch.answers[i]
                if msg is not None:
                    done[i] = _read_ack(msg, target(self.config.subject, items[i][0].type))

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
