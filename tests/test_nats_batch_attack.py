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


def test_a_late_ack_for_a_timed_out_publish_is_not_taken_for_the_next_attempts() -> None:
    """Attempt one's publish of an update goes unanswered and times out (a stored created event
    keeps the connection); during attempt two, on the same connection, for the same event, the ack
    to attempt one's reply subject arrives: it is not this publish's ack, so attempt two still fails."""
    import nats
    from nats.aio.msg import Msg

    brokers.require(4222, "NATS")
    stream = brokers.name("CW")
    prefix = stream.lower()

    async def go() -> None:
        nc = await nats.connect(NATS_URL, allow_reconnect=False)
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[prefix + ".lead.created"])
        replies: list[str] = []

        async def answers_the_first_one_late(msg: Msg) -> None:
            replies.append(msg.reply)
            if len(replies) == 2:  # attempt two's publish is in: now attempt one's ack comes
                await nc.publish(replies[0], b'{"stream": "%s", "seq": 1}' % stream.encode())

        await nc.subscribe(prefix + ".lead.updated", cb=answers_the_first_one_late)
        await nc.flush()
        sink = _sink(NATS_URL, prefix + ".{type}", timeout=1.0)
        update = _event(2, "lead.updated", "v2")
        try:
            first = await sink.deliver_each([_event(1), update])
            link = sink._link
            second = await sink.deliver_each([_event(3), update])
            assert sink._link is link is not None  # the same connection and reply subscription
        finally:
            await sink.aclose()
            await js.delete_stream(stream)
            await nc.close()
        assert [isinstance(r, Attempt) for r in first] == [True, False]
        assert [isinstance(r, Attempt) for r in second] == [True, False]
        assert len(replies) == 2 and replies[0] != replies[1]

    asyncio.run(go())
