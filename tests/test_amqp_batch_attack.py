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


def test_the_same_event_twice_in_flight_is_never_confirmed_by_the_other_copys_ack(amqp_up: None) -> None:
    """aiormq finds the message a basic.return is for by its message_id, one tag per id. With two
    unconfirmed messages of one id on the channel, the first copy's return failed the second and
    the first copy's ack then reported it delivered, though no queue took either."""
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
