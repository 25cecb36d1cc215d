"""Attacks on the AMQP sink's one-write batch (AmqpSink._publish_many) against the real RabbitMQ.

The batch registers its delivery tags, confirmation futures and message ids in aiormq's channel
itself. An attempt counts as delivered only when RabbitMQ confirmed that very message, so each test
here checks the outcome of every event against what the broker did with it.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support import brokers
from tests.support.brokers import AMQP_URL
from tests.test_broker_sinks import _event, _sink
from watcher.config import SinkConfig
from watcher.errors import DeliveryError


@pytest.fixture
def amqp_up() -> None:
    brokers.require(5672, "RabbitMQ")


@pytest.mark.parametrize("path", ["one write", "library publish"])
def test_the_same_event_twice_in_flight_is_never_confirmed_by_the_other_copys_ack(
    path: str, amqp_up: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiormq finds the message a basic.return is for by its message_id, one tag per id. With two
    unconfirmed messages of one id on the channel, the first copy's return failed the second and
    the first copy's ack then reported it delivered, though no queue took either; through the one
    write and through aio-pika's own publish (the path taken when aiormq lacks the batch's parts)."""
    from watcher.sinks import amqp

    if path == "library publish":
        monkeypatch.setattr(amqp, "_batchable", lambda channel: False)
    unroutable = _event(1, "lead.nobody")

    async def go(exchange: str) -> tuple[list[object], list[object]]:
        sink = _sink(SinkConfig("rabbit", "amqp", AMQP_URL, exchange=exchange, routing_key="{type}"))
        try:
            in_one = await sink.deliver_each([unroutable, unroutable])
            (a,), (b,) = await asyncio.gather(sink.deliver_each([unroutable]), sink.deliver_each([unroutable]))
            return list(in_one), [a, b]
        finally:
            await sink.aclose()

    with brokers.rabbit(bind="lead.created") as mq:
        in_one, concurrent = asyncio.run(go(mq.exchange))
        assert mq.messages() == []
    assert all(isinstance(r, DeliveryError) for r in in_one), in_one
    assert all(isinstance(r, DeliveryError) for r in concurrent), concurrent


def test_a_return_read_just_after_the_attempt_was_cancelled_leaves_the_channel_working(amqp_up: None) -> None:
    """The attempt's timeout can cancel its confirmations in the same loop pass in which the
    channel's reader gets the last frame of a basic.return for one of them. The message id still
    led to the cancelled future (it was let go only by a callback run later), aiormq set the
    return's error on it, InvalidStateError ended the channel's reader, and RabbitMQ then closed the
    whole connection (504 CHANNEL_ERROR) under the next attempt and every other one on it."""
    from pamqp.commands import Basic

    unroutable, routable = _event(1, "lead.nobody"), _event(2, "lead.created")

    async def go(exchange: str) -> tuple[bool, bool, object]:
        sink = _sink(SinkConfig("rabbit", "amqp", AMQP_URL, exchange=exchange, routing_key="{type}"))
        try:
            await sink.deliver_each([routable])
            link = sink._link
            assert link is not None
            channel = await link.channel.get_underlay_channel()
            attempt: list[asyncio.Task[object]] = []

            class CancelAtReturn(asyncio.Queue[tuple[int, object]]):
                async def put(self, item: tuple[int, object]) -> None:
                    if isinstance(item[1], Basic.Return):
                        # As the attempt's timeout would, in the loop pass in which the connection
                        # hands the return to the channel: the attempt's cancellation runs before
                        # the channel's reader reads the return, the callbacks it schedules after.
                        attempt[0].cancel()
                    await super().put(item)

            channel.frames.__class__ = CancelAtReturn
            attempt.append(asyncio.create_task(sink.deliver_each([unroutable])))
            cancelled = False
            try:
                await attempt[0]
            except asyncio.CancelledError:
                cancelled = True
            (after,) = await sink.deliver_each([routable])
            return cancelled, sink._link is link and not channel.is_closed, after
        finally:
            await sink.aclose()

    with brokers.rabbit(bind="lead.created") as mq:
        cancelled, same_channel, after = asyncio.run(go(mq.exchange))
    assert cancelled
    assert not isinstance(after, DeliveryError), after
    assert same_channel, "the channel closed under the next attempt"


def test_concurrent_batches_settle_each_message_by_its_own_ack_return_or_nack(amqp_up: None) -> None:
    """Six attempts of 32 on one channel at once, their tags interleaved and settled by RabbitMQ's
    single and multiple acks, with returns (an unbound type) and nacks (a full reject-publish
    queue) among them: each event's outcome is what the broker did with that very message."""
    import aio_pika

    def kind(b: int, i: int) -> str:
        return ("lead.created", "lead.nobody", "lead.full")[(i * 7 + b) % 3]

    async def go(mq: brokers.Rabbit) -> tuple[list[tuple[str, object]], int]:
        connection = await aio_pika.connect(AMQP_URL)
        channel = await connection.channel()
        full = await channel.declare_queue(
            brokers.name("cw-q-"), auto_delete=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await full.bind(await channel.get_exchange(mq.exchange), "lead.full")
        sink = _sink(SinkConfig("rabbit", "amqp", AMQP_URL, exchange=mq.exchange, routing_key="{type}"))
        try:
            await sink.reach()
            batches = [[_event(100 * b + i, kind(b, i)) for i in range(32)] for b in range(6)]
            results = await asyncio.gather(*(sink.deliver_each(batch) for batch in batches))
            link = sink._link
            assert link is not None
            underlay = await link.channel.get_underlay_channel()
            out = [
                (e.type, r) for batch, rs in zip(batches, results, strict=True) for e, r in zip(batch, rs, strict=True)
            ]
            return out, len(underlay.message_id_delivery_tag)
        finally:
            await sink.aclose()
            await full.delete(if_unused=False, if_empty=False)
            await connection.close()

    with brokers.rabbit(bind="lead.created") as mq:
        outcomes, ids_left = asyncio.run(go(mq))
        stored = sorted(str(m.message_id) for m in mq.messages())
    for type_, result in outcomes:
        if type_ == "lead.created":
            assert not isinstance(result, DeliveryError), (type_, result)
        else:
            assert isinstance(result, DeliveryError), (type_, result)
            assert ("returned" if type_ == "lead.nobody" else "refused") in str(result)
    assert len(stored) == sum(t == "lead.created" for t, _ in outcomes) == len(set(stored))
    assert ids_left == 0  # every settled message let go of its id
