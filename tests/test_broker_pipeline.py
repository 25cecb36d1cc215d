"""Pipelined broker attempts against the real brokers: several events published in one attempt,
each with its own outcome, and the per-lead order kept when part of an attempt fails.

NATS JetStream (4222), RabbitMQ (5672) and Redis (6379) on 127.0.0.1; a Redis whose memory runs
out mid-pipeline is a server of the test's own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.support import brokers
from tests.support.brokers import AMQP_URL, NATS_URL, headers_of
from tests.support.daemon import WEBHOOK_KEY
from watcher.clock import FakeClock, SystemClock
from watcher.config import SinkConfig
from watcher.delivery.dispatcher import Dispatcher
from watcher.delivery.lane import PassResult
from watcher.delivery.policy import PipelinedSink
from watcher.errors import DeliveryError
from watcher.events import LEAD_CREATED, LEAD_UPDATED, Event, event_id
from watcher.records import PageCommit
from watcher.sinks import build_sink
from watcher.sinks.base import Attempt
from watcher.sinks.broker import PIPELINE, BrokerSink
from watcher.state.records import DELIVERED, PENDING
from watcher.state.store import Store

NOW = 1_764_000_000.0


def _event(n: int, type_: str = LEAD_CREATED, version: str = "", pad: int = 0) -> Event:
    resource = f"lead:{n}"
    data: dict[str, Any] = {"lead": {"id": n, "note": "x" * pad}}
    return Event(event_id(type_, resource, version), type_, "2026-11-26T18:35:40.512Z", data, resource, 1)


def _deliver_each(config: SinkConfig, events: list[Event]) -> list[Attempt | DeliveryError]:
    async def go() -> list[Attempt | DeliveryError]:
        sink = build_sink(config, clock=SystemClock(), version="test")
        assert isinstance(sink, BrokerSink) and isinstance(sink, PipelinedSink)
        try:
            return await sink.deliver_each(events)
        finally:
            await sink.aclose()

    return asyncio.run(go())


async def _nats_stream(
    url: str, stream: str, subjects: list[str], *, update: bool = False, delete: bool = False
) -> None:
    import nats

    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        if delete:
            await js.delete_stream(stream)
        elif update:
            await js.update_stream(name=stream, subjects=subjects)
        else:
            await js.add_stream(name=stream, subjects=subjects)
    finally:
        await nc.close()


@pytest.fixture
def created_only() -> Any:
    """A JetStream stream storing `<prefix>.lead.created` only: a lead.updated publish has no stream."""
    brokers.require(4222, "NATS")
    stream = brokers.name("CW")
    prefix = stream.lower()
    asyncio.run(_nats_stream(NATS_URL, stream, [f"{prefix}.lead.created"]))
    try:
        yield stream, prefix
    finally:
        asyncio.run(_nats_stream(NATS_URL, stream, [], delete=True))


def _taken(results: list[Attempt | DeliveryError]) -> list[bool]:
    return [isinstance(r, Attempt) for r in results]


# --- one attempt, several events, an outcome each ---------------------------------------------


def test_broker_sinks_pipeline_up_to_their_batch() -> None:
    """Each broker sink takes up to PIPELINE events per attempt; a webhook still takes one."""
    for kind, where in (("nats", {"subject": "s"}), ("amqp", {"exchange": "e"}), ("redis", {"stream": "k"})):
        sink = build_sink(SinkConfig("b", kind, "x://127.0.0.1", **where), clock=SystemClock(), version="t")  # type: ignore[arg-type]
        assert isinstance(sink, PipelinedSink) and sink.max_batch == PIPELINE > 1
    hook = build_sink(SinkConfig("w", "webhook", "http://127.0.0.1:9/"), clock=SystemClock(), version="t")
    assert not isinstance(hook, PipelinedSink)


def test_nats_mid_batch_refusal_fails_only_that_event(created_only: Any) -> None:
    """Created, updated, created in one attempt: the stream stores the two it takes, and only the
    update (no stream stores its subject) is a failure, named as such."""
    stream, prefix = created_only
    events = [_event(1), _event(2, LEAD_UPDATED, "v2"), _event(3)]
    config = SinkConfig("bus", "nats", NATS_URL, subject=prefix + ".{type}", secrets=(WEBHOOK_KEY,))
    results = _deliver_each(config, events)
    assert _taken(results) == [True, False, True]
    assert f"no JetStream stream stores subject {prefix}.lead.updated" in str(results[1])
    stored = brokers.JetStream(NATS_URL, stream, prefix).messages()
    assert [m.headers["Nats-Msg-Id"] for m in stored] == [events[0].id, events[2].id]


@pytest.mark.parametrize("path", ["one write", "library publish"])
def test_amqp_mid_batch_return_fails_only_that_event(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queue bound to lead.created only: the update in the middle comes back, the others are
    confirmed; the same through the batch written at once and through aio-pika's own publish (the
    path taken when an aiormq release lacks the channel parts the batch uses)."""
    from watcher.sinks import amqp

    if path == "library publish":
        monkeypatch.setattr(amqp, "_batchable", lambda channel: False)
    brokers.require(5672, "RabbitMQ")
    with brokers.rabbit(bind="lead.created") as mq:
        events = [_event(1), _event(2, LEAD_UPDATED, "v2"), _event(3)]
        config = SinkConfig("rabbit", "amqp", AMQP_URL, exchange=mq.exchange, secrets=(WEBHOOK_KEY,))
        results = _deliver_each(config, events)
        assert _taken(results) == [True, False, True]
        assert "returned by the broker" in str(results[1])
        assert sorted(headers_of(m)["webhook-id"] for m in mq.messages()) == sorted([events[0].id, events[2].id])


def test_redis_pipeline_out_of_memory_midway_fails_exactly_the_refused_entries() -> None:
    """A Redis that runs out of memory part-way through one pipeline: the entries it replied to are
    the attempts that count, the refused ones fail, and the stream holds exactly the confirmed ones."""
    with brokers.own_redis() as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        used = int(asyncio.run(_redis_used_memory(url)))
        asyncio.run(_redis_call(url, "config_set", "maxmemory", str(used + 300_000)))
        asyncio.run(_redis_call(url, "config_set", "maxmemory-policy", "noeviction"))
        events = [_event(n, pad=60_000) for n in range(20)]
        results = _deliver_each(SinkConfig("stream", "redis", url, stream="k", secrets=(WEBHOOK_KEY,)), events)
        taken = _taken(results)
        assert taken[0] and not taken[-1]  # some went in, then memory ran out
        assert taken == sorted(taken, reverse=True)  # accepted, then refused: never one among the other
        refused = [r for r in results if isinstance(r, DeliveryError)]
        assert all("refused the entry" in str(r) and "maxmemory" in str(r) for r in refused), refused[:1]
        entries = brokers.RedisStream(url, "k").entries()
        assert [f[b"webhook-id"].decode() for _id, f in entries] == [
            e.id for e, ok in zip(events, taken, strict=True) if ok
        ]


async def _redis_call(url: str, method: str, *args: Any) -> Any:
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(url)
    try:
        return await getattr(client, method)(*args)
    finally:
        await client.aclose()


async def _redis_used_memory(url: str) -> int:
    info = await _redis_call(url, "info", "memory")
    return int(info["used_memory"])


# --- the engine: order per lead and an outcome per event, with part of each attempt failing ----


def test_a_pipelined_attempt_fails_only_its_refused_events_and_their_leads_wait(
    created_only: Any, tmp_path: Path
) -> None:
    """Forty leads, two events each; the odd leads' first event has no stream yet. One pass sends
    every first event in pipelined attempts: the even leads' are stored and their second events go
    too, the odd leads' fail alone, and their second events are not sent while the first waits.
    Once the stream takes every subject, the retries go, then the rest: each lead in order, once."""
    stream, prefix = created_only
    clock = FakeClock(NOW)
    store = Store.open(tmp_path / "state.db")
    leads = range(40)
    firsts = [_event(n, LEAD_UPDATED if n % 2 else LEAD_CREATED, "1") for n in leads]
    seconds = [_event(n, LEAD_CREATED, "2") for n in leads]
    store.commit_page(PageCommit("leads", NOW, events=[(e, ["bus"]) for e in firsts]))
    store.commit_page(PageCommit("leads", NOW, events=[(e, ["bus"]) for e in seconds]))
    config = SinkConfig(
        "bus", "nats", NATS_URL, subject=prefix + ".{type}", secrets=(WEBHOOK_KEY,), retry_schedule=(10.0,)
    )
    sink = build_sink(config, clock=SystemClock(), version="test")
    sizes: list[int] = []
    assert isinstance(sink, BrokerSink)
    deliver_each = sink.deliver_each

    async def counted(events: Any) -> list[Attempt | DeliveryError]:
        sizes.append(len(events))
        assert len({e.resource for e in events}) == len(events)  # never two events of one lead in one attempt
        return await deliver_each(events)

    sink.deliver_each = counted  # type: ignore[method-assign]
    dispatcher = Dispatcher(store, [sink], clock)
    evens, odds = [n for n in leads if n % 2 == 0], [n for n in leads if n % 2]
    js = brokers.JetStream(NATS_URL, stream, prefix)

    async def passes() -> tuple[PassResult, list[str], dict[str, str], PassResult]:
        # One loop for both passes: the sink keeps its connection between them, as in the daemon.
        first = await dispatcher.deliver_due_once()
        stored = [m.headers["Nats-Msg-Id"] for m in await asyncio.to_thread(js.messages)]
        status = {d["event_id"]: d["status"] for d in store.deliveries()}
        await _nats_stream(NATS_URL, stream, [f"{prefix}.>"], update=True)
        clock.advance(30)  # past every retry (10 s and its jitter)
        second = await dispatcher.deliver_due_once()
        await sink.aclose()
        return first, stored, status, second

    try:
        first, stored, status, second = asyncio.run(passes())
        assert first == PassResult(attempted=60, delivered=40, failed=20)
        assert max(sizes) > 1  # the pass did pipeline
        assert sorted(stored) == sorted([firsts[n].id for n in evens] + [seconds[n].id for n in evens])
        assert all(status[firsts[n].id] == PENDING and status[seconds[n].id] == PENDING for n in odds)
        failed = [a["event_id"] for a in store.attempts("bus") if a["error"]]
        assert sorted(failed) == sorted(firsts[n].id for n in odds)  # an outcome each: only the refused failed
        assert second == PassResult(attempted=40, delivered=40, failed=0)
        order = [m.headers["Nats-Msg-Id"] for m in js.messages()]
        assert len(order) == len(set(order)) == 80
        for n in leads:
            assert order.index(firsts[n].id) < order.index(seconds[n].id)
        assert all(d["status"] == DELIVERED for d in store.deliveries())
    finally:
        store.close()


def test_the_installed_aiormq_has_the_channel_parts_the_amqp_batch_uses() -> None:
    """The batch path is the one that runs with the aiormq this project installs: a release that
    reshapes the channel falls back to one publish per message (correct, slower), and this says so."""
    from watcher.sinks import amqp

    brokers.require(5672, "RabbitMQ")

    async def go() -> bool:
        import aio_pika

        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel(publisher_confirms=True)
            return amqp._batchable(await channel.get_underlay_channel())
        finally:
            await connection.close()

    assert asyncio.run(go())
