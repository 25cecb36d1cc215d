"""Broker outages and a killed daemon: nothing lost, JetStream stores each event once, and a hung
broker holds up no other sink.

The brokers cut here belong to the test: a nats-server or redis-server on a free port, or a
RabbitMQ vhost of its own whose connections `rabbitmqctl` closes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import serving
from tests.support import brokers
from tests.support.brokers import headers_of
from tests.support.daemon import Daemon, events_json, wait_until, write_config
from tests.test_broker_e2e import amqp_sink, created_leads, nats_sink, redis_sink, verified
from tests.test_broker_sinks import _silent_listener
from watcher.simulator import Simulator, SimulatorServer

pytestmark = pytest.mark.faults

# Retries every second or so while a broker is away (the connection's own pause is what spaces
# the tries out), and more of them than any outage here lasts.
PATIENT = ["1s"] * 60


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=9, campaigns=2, leads=4) as pair:
        yield pair


def _failed_attempts(daemon: Daemon) -> int:
    return daemon.log().count('"delivery failed"')


def test_nats_restart_mid_stream_loses_nothing_and_stores_each_event_once(tmp_path: Path, sim) -> None:
    """The NATS server stops while leads stream in and comes back: every event ends up in the stream, once."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    with brokers.own_nats(tmp_path / "jetstream") as nats_server:
        url = f"nats://127.0.0.1:{nats_server.port}"
        with brokers.jetstream(url) as js:
            config = write_config(tmp_path, server.url, [nats_sink(js, retry_schedule=PATIENT)])
            with Daemon(config) as daemon:
                daemon.wait_polls(1)
                leads = simulator.add_leads(10, campaign)
                wait_until(lambda: js.count() >= 10, 30, "the first leads")
                nats_server.stop()
                leads += simulator.add_leads(10, campaign)
                wait_until(lambda: _failed_attempts(daemon) >= 2, 30, "attempts failing while the server is down")
                nats_server.start()
                wait_until(lambda: js.count() >= 20, 60, "every lead after the restart")
                wait_until(lambda: not events_json(config, "--status", "pending"), 30, "an empty outbox")
                assert daemon.stop() == 0
            messages = js.messages()
    ids = [event_id for event_id, _ in verified(messages)]
    assert len(ids) == len(set(ids)) == 20
    assert sorted(created_leads(messages)) == sorted(leads)


def test_redis_restart_mid_stream_loses_nothing(tmp_path: Path, sim) -> None:
    """Redis stops and comes back: every event is in the stream afterwards; a resend, if any, carries
    the same webhook-id (what a consumer dedupes on)."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    with brokers.own_redis(persist=tmp_path / "redis") as redis_server:
        rs = brokers.RedisStream(f"redis://127.0.0.1:{redis_server.port}/0", brokers.name("cw:"))
        config = write_config(tmp_path, server.url, [redis_sink(rs, retry_schedule=PATIENT)])
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            leads = simulator.add_leads(8, campaign)
            wait_until(lambda: len(rs.entries()) >= 8, 30, "the first leads")
            redis_server.stop()
            leads += simulator.add_leads(8, campaign)
            wait_until(lambda: _failed_attempts(daemon) >= 2, 30, "attempts failing while Redis is down")
            redis_server.start()
            wait_until(lambda: not events_json(config, "--status", "pending"), 60, "an empty outbox")
            assert daemon.stop() == 0
        entries = rs.entries()
    by_id = {event_id: event["data"]["lead"]["id"] for event_id, event in verified(entries)}
    assert sorted(by_id.values()) == sorted(leads)
    assert len(by_id) == 16


def test_amqp_connections_closed_by_the_broker_mid_stream_lose_nothing(tmp_path: Path, sim) -> None:
    """`rabbitmqctl close_all_connections` on the sink's vhost between leads: the sink connects again
    and every event reaches the queue (a resend carries the same message_id)."""
    brokers.require(5672, "RabbitMQ")
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    with brokers.rabbit_vhost() as url, brokers.rabbit(url=url) as mq:
        vhost = url.rsplit("/", 1)[1]
        config = write_config(tmp_path, server.url, [amqp_sink(mq, retry_schedule=PATIENT)])
        received: list[object] = []
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            leads = simulator.add_leads(6, campaign)
            wait_until(lambda: received.extend(mq.messages()) or len(received) >= 6, 30, "the first leads")
            # The daemon's one connection; the test's own reads close theirs, which the broker may
            # still list for a moment after messages() returns.
            wait_until(lambda: brokers.rabbit_connections(vhost) == 1, 15, "only the daemon's connection left")
            brokers.rabbitmqctl("close_all_connections", "-p", vhost, "test: broker-side close")
            leads += simulator.add_leads(6, campaign)

            def all_in() -> bool:
                received.extend(mq.messages())
                return len({headers_of(m)["webhook-id"] for m in received}) >= len(leads)

            wait_until(all_in, 60, "every lead after the broker closed the connection")
            assert daemon.stop() == 0
        received.extend(mq.messages())
    by_id = {event_id: event["data"]["lead"]["id"] for event_id, event in verified(received)}
    assert sorted(by_id.values()) == sorted(leads)


def test_sigkill_mid_stream_loses_nothing_and_jetstream_stores_each_event_once(tmp_path: Path, sim) -> None:
    """The daemon is SIGKILLed while it publishes a backlog; after a restart every event is in the
    stream exactly once (a publish confirmed but not yet recorded is resent and de-duplicated)."""
    brokers.require(4222, "NATS")
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    with brokers.jetstream() as js:
        config = write_config(tmp_path, server.url, [nats_sink(js, concurrency=1)], convertr={"items_per_page": 20})
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            leads = simulator.add_leads(300, campaign)
            wait_until(lambda: js.count() >= 1, 30, "the first publish")
            assert daemon.proc is not None
            os.kill(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait()
        before = js.count()
        with Daemon(config) as daemon:
            wait_until(lambda: js.count() >= 300, 60, "every lead after the restart")
            wait_until(lambda: not events_json(config, "--status", "pending"), 30, "an empty outbox")
            assert daemon.stop() == 0
        messages = js.messages()
    assert before < 300, "the kill came after the whole backlog was out: not mid-stream"
    ids = [event_id for event_id, _ in verified(messages)]
    assert len(ids) == len(set(ids)) == 300
    assert sorted(created_leads(messages)) == sorted(leads)


def test_a_hung_broker_delays_no_other_sink(tmp_path: Path, sim) -> None:
    """A NATS 'server' that accepts connections and never answers holds up only its own sink: Redis
    gets every event at once while the hung sink's events wait, pending."""
    brokers.require(6379, "Redis")
    simulator, server = sim
    with _silent_listener() as (port, _accepted), brokers.redis_stream() as rs:
        hung = {"name": "hung", "type": "nats", "url": f"nats://127.0.0.1:{port}", "subject": "x.{type}",
                "timeout": "3s", "retry_schedule": PATIENT}  # fmt: skip
        config = write_config(tmp_path, server.url, [hung, redis_sink(rs)])
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            leads = simulator.add_leads(12, simulator.campaign_ids()[0])
            wait_until(lambda: len(rs.entries()) >= 12, 15, "every lead on the healthy sink")
            pending = events_json(config, "--status", "pending", "--sink", "hung")
            assert daemon.stop() == 0
        assert sorted(created_leads(rs.entries())) == sorted(leads)
    assert len(pending) == 12
