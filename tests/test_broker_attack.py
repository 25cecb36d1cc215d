"""Attacks on the broker sinks that found faults: each test names the attack and what must hold.

A broker that goes silent after the handshake (a proxy that stops forwarding), a message over the
broker's size limit, and refused credentials met again inside the connection pause. The attacks
that held (restarts mid-confirm, a full stream, returned and nacked messages, a deleted stream or
exchange) are covered in test_broker_sinks.py and test_broker_outages.py.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support import brokers
from tests.test_broker_sinks import _event, _sink
from watcher.clock import FakeClock, SystemClock
from watcher.config import SinkConfig
from watcher.errors import DeliveryError, SinkGone
from watcher.events import Event, event_id
from watcher.sinks.base import render_data
from watcher.sinks.broker import message_headers

# AMQP 0-9-1 Channel.Open (class 20, method 10): the first thing a client asks after the handshake.
CHANNEL_OPEN = b"\x00\x14\x00\x0a"


class _Proxy:
    """A TCP proxy to a real broker that can go silent: it keeps every socket open and forwards
    nothing either way, as a broker that stopped answering mid-connection would."""

    def __init__(self, port: int, freeze_on: bytes | None = None) -> None:
        self.target = port
        self.freeze_on = freeze_on  # go silent once the client has sent these bytes
        self.frozen = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self._server.settimeout(0.05)
        while not self._stop.is_set():
            try:
                client = self._server.accept()[0]
            except OSError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [client, upstream]
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        while not self._stop.is_set():
            if self.frozen:
                self._stop.wait(0.02)
                continue
            ready, _, _ = select.select([client, upstream], [], [], 0.05)
            for sock in ready:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    return
                (upstream if sock is client else client).sendall(data)
                if sock is client and self.freeze_on is not None and self.freeze_on in data:
                    self.frozen = True

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        for sock in [self._server, *self._socks]:
            sock.close()


@contextmanager
def _proxy(port: int, freeze_on: bytes | None = None) -> Iterator[_Proxy]:
    proxy = _Proxy(port, freeze_on)
    try:
        yield proxy
    finally:
        proxy.close()


def _header_bytes(headers: dict[str, str]) -> int:
    """What a NATS HPUB spends on headers: "NATS/1.0" and a blank line, a "key: value" line each."""
    return len(b"NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items())


def _big(n: int, size: int) -> Event:
    """A lead event whose body grows by exactly `size` bytes (an ASCII name)."""
    resource = f"lead:{n}"
    type_ = "lead.created"
    return Event(
        event_id(type_, resource, str(n)),
        type_,
        "2026-11-26T18:35:40.512Z",
        {"lead": {"id": n, "name": "x" * size}},
        resource,
    )


# --- a broker that stops answering: the attempt ends at `timeout`, not later ----------------


def test_amqp_broker_silent_after_confirm_wait_ends_the_attempt_at_its_timeout() -> None:
    """A connected AMQP broker that stops answering: the attempt fails at `timeout`; dropping the
    dead connection (a polite close waits for close-ok) is not added to it."""
    brokers.require(5672, "RabbitMQ")

    async def go(proxy: _Proxy, exchange: str) -> tuple[float, str, bool]:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        sink = _sink(SinkConfig("rabbit", "amqp", url, exchange=exchange, timeout=0.5))
        try:
            await sink.deliver([_event(1)])
            proxy.frozen = True
            started = time.monotonic()
            with pytest.raises(DeliveryError) as caught:
                await sink.deliver([_event(2)])
            took = time.monotonic() - started
            return took, str(caught.value), sink._link is None
        finally:
            await sink.aclose()

    with brokers.rabbit() as rb, _proxy(5672) as proxy:
        took, error, dropped = asyncio.run(go(proxy, rb.exchange))
    assert error == "no confirmation from the AMQP broker within 0.5s" and dropped
    assert took < 1.2, f"a 0.5 s timeout took {took:.2f}s"  # the old polite close added 1 s


def test_amqp_broker_silent_at_channel_open_ends_the_attempt_at_its_timeout() -> None:
    """The broker finishes the handshake, then never answers Channel.Open: the attempt fails at
    `timeout` (closing the half-made connection does not hold it), and delivers once it answers."""
    brokers.require(5672, "RabbitMQ")

    async def go(proxy: _Proxy, exchange: str, clock: FakeClock) -> tuple[float, str]:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        sink = _sink(SinkConfig("rabbit", "amqp", url, exchange=exchange, timeout=0.5), clock)
        try:
            started = time.monotonic()
            with pytest.raises(DeliveryError) as caught:
                await sink.deliver([_event(1)])
            took = time.monotonic() - started
            proxy.frozen, proxy.freeze_on = False, None
            clock.advance(1.0)  # past the connection pause
            await sink.deliver([_event(2)])
            return took, str(caught.value)
        finally:
            await sink.aclose()

    with brokers.rabbit() as rb, _proxy(5672, freeze_on=CHANNEL_OPEN) as proxy:
        took, error = asyncio.run(go(proxy, rb.exchange, FakeClock()))
        delivered = [m.message_id for m in rb.messages()]
    assert error == "no answer from the AMQP broker within 0.5s while connecting"
    assert took < 1.2, f"a 0.5 s timeout took {took:.2f}s"  # the awaited close added about 2 s
    assert delivered == [_event(2).id]


# --- a message over the broker's size limit -------------------------------------------------


def test_nats_message_over_max_payload_with_its_headers_is_refused_without_breaking_the_connection() -> None:
    """nats-py checks the body alone against max_payload; the server counts the headers too and
    drops the connection (every ack awaited on it with it). A body that fits only without its
    headers is refused before sending, naming both sizes; one byte less is stored."""
    brokers.require(4222, "NATS")

    async def go(subject: str) -> tuple[str, int, bool]:
        sink = _sink(SinkConfig("stream", "nats", brokers.NATS_URL, subject=subject, timeout=5.0))
        try:
            await sink.reach()
            link = sink._link
            assert link is not None
            client = link.client
            limit = client.max_payload
            probe = _big(7, 0)
            base = len(probe.body(render_data(probe, sink.config)))
            headers = message_headers(probe, int(time.time()), b"", ())
            room = limit - base - _header_bytes({"Nats-Msg-Id": probe.id, **headers})
            with pytest.raises(DeliveryError) as caught:
                await sink.deliver([_big(7, room + 1)])
            await sink.deliver([_big(8, room)])
            await sink.deliver([_event(9)])
            kept = sink._link is link and bool(client.is_connected)  # never dropped
            return str(caught.value), limit, kept
        finally:
            await sink.aclose()

    with brokers.jetstream() as js:
        error, limit, kept = asyncio.run(go(js.prefix + ".{type}"))
        stored = [m.headers["webhook-id"] for m in js.messages()]
    assert error.startswith(
        f"the message ({limit + 1} bytes with its headers) is over the NATS server's max_payload ({limit} bytes)"
    )
    assert stored == [_big(8, 0).id, _event(9).id] and kept


def test_redis_entry_over_proto_max_bulk_len_fails_alone() -> None:
    """Redis answers a bulk over proto-max-bulk-len with a protocol error and closes the connection:
    that attempt fails, and the next event goes out on a new connection at its first attempt."""
    port = brokers.free_port()
    argv = [brokers.binary("redis-server", "/usr/bin/redis-server"), "--bind", "127.0.0.1", "--port", str(port)]
    argv += ["--save", "", "--appendonly", "no", "--proto-max-bulk-len", "1mb"]

    async def go(url: str) -> str:
        sink = _sink(SinkConfig("stream", "redis", url, stream="s", timeout=5.0))
        try:
            with pytest.raises(DeliveryError) as caught:
                await sink.deliver([_big(1, 1_100_000)])
            await sink.deliver([_event(2)])  # used to fail: "Connection closed by the server"
            return str(caught.value)
        finally:
            await sink.aclose()

    with brokers.OwnServer(argv, port):
        url = f"redis://127.0.0.1:{port}/0"
        error = asyncio.run(go(url))
        entries = brokers.RedisStream(url, "s").entries()
    # The server answers the error, or resets the connection while the body is still being written.
    assert "over the server's proto-max-bulk-len" in error or "connection reset" in error.lower(), error
    assert [f[b"webhook-id"].decode() for _, f in entries] == [_event(2).id]


# --- refused credentials stay a refusal inside the connection pause --------------------------


def test_refused_credentials_stay_final_for_every_attempt_inside_the_pause() -> None:
    """The refusal disables the sink (SinkGone); attempts that meet the connection pause it started
    (other lanes of the sink, the first event after the start-up probe) must say the same, not
    count as an ordinary failure that uses up a step of their events' schedule."""
    with brokers.own_redis(password=brokers.BROKER_PASSWORD) as server:
        url = f"redis://:wrong-{brokers.BROKER_PASSWORD}@127.0.0.1:{server.port}/0"

        async def go() -> list[BaseException]:
            sink = _sink(SinkConfig("stream", "redis", url, stream="s"), SystemClock())
            try:
                with pytest.raises(DeliveryError):
                    await sink.reach()  # the start-up probe
                results = await asyncio.gather(*(sink.deliver([_event(n)]) for n in range(3)), return_exceptions=True)
                return [r for r in results if isinstance(r, BaseException)]
            finally:
                await sink.aclose()

        errors = asyncio.run(go())
    assert len(errors) == 3
    assert all(isinstance(e, SinkGone) for e in errors), [type(e).__name__ for e in errors]
    assert all("refused the credentials" in str(e) and brokers.BROKER_PASSWORD not in str(e) for e in errors)
