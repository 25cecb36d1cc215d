"""Attacks on the NATS sink's own ack routing (one reply-inbox subscription per connection, each
publish with its own reply subject), against real nats-servers: the shared one on 4222 and, for a
server that dies mid-batch, one of the test's own."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from tests.support import brokers
from tests.support.brokers import NATS_URL
from tests.test_broker_pipeline import _event
from watcher.clock import SystemClock
from watcher.config import SinkConfig
from watcher.errors import DeliveryError
from watcher.sinks import build_sink
from watcher.sinks.base import Attempt
from watcher.sinks.nats import NatsSink


def _sink(url: str, subject: str, timeout: float = 10.0) -> NatsSink:
    sink = build_sink(
        SinkConfig("bus", "nats", url, subject=subject, timeout=timeout), clock=SystemClock(), version="t"
    )
    assert isinstance(sink, NatsSink)
    return sink


def test_a_full_stream_refusal_is_named_as_jetstreams_refusal() -> None:
    """A stream at max_msgs with discard=new refuses the second message with an error reply: that
    message fails, saying JetStream refused it and why, not that no acknowledgement came."""
    import nats
    from nats.js.api import DiscardPolicy, StreamConfig

    brokers.require(4222, "NATS")
    stream = brokers.name("CW")
    prefix = stream.lower()

    async def go() -> list[Attempt | DeliveryError]:
        nc = await nats.connect(NATS_URL, allow_reconnect=False)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[prefix + ".>"], max_msgs=1, discard=DiscardPolicy.NEW))
        sink = _sink(NATS_URL, prefix + ".{type}")
        try:
            return await sink.deliver_each([_event(1), _event(2)])
        finally:
            await sink.aclose()
            await js.delete_stream(stream)
            await nc.close()

    first, second = asyncio.run(go())
    assert isinstance(first, Attempt)
    assert isinstance(second, DeliveryError)
    assert "JetStream refused the message: maximum messages exceeded (error 10077)" in str(second)


def test_a_connection_lost_mid_batch_fails_its_attempt_at_once(tmp_path: Path) -> None:
    """The server dies with a batch's acks outstanding: the attempt fails as a lost connection
    when the connection closes, not after waiting out its whole timeout for replies that cannot
    come; the next attempt, on a new connection to the restarted server, delivers."""
    import nats

    server = brokers.own_nats(tmp_path / "js").start()
    url = f"nats://127.0.0.1:{server.port}"
    assert server.proc is not None

    async def go() -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        await nc.jetstream().add_stream(name="S", subjects=["s.>"])
        await nc.close()
        sink = _sink(url, "s.{type}", timeout=30.0)
        try:
            assert all(isinstance(r, Attempt) for r in await sink.deliver_each([_event(1)]))
            os.kill(server.proc.pid, signal.SIGSTOP)  # takes the batch, answers nothing

            async def kill_once_sent() -> None:
                while sink._link is None or not sink._link.waiting:
                    await asyncio.sleep(0.01)
                os.kill(server.proc.pid, signal.SIGKILL)

            started = time.monotonic()
            results, _ = await asyncio.gather(sink.deliver_each([_event(n) for n in range(2, 6)]), kill_once_sent())
            took = time.monotonic() - started
            assert all(isinstance(r, DeliveryError) for r in results)
            assert "connection to the NATS server was lost" in str(results[0])
            assert took < 10.0, f"the attempt waited {took:.1f}s for acks from a closed connection"
            server.proc.wait()
            server.start()
            again = await sink.deliver_each([_event(n) for n in range(2, 6)])
            assert all(isinstance(r, Attempt) for r in again)
        finally:
            await sink.aclose()

    try:
        asyncio.run(go())
    finally:
        server.stop()
