"""The daemon (`convertr-watcher run` in a subprocess) delivering to the real brokers on 127.0.0.1.

Simulator → daemon → NATS JetStream, RabbitMQ and Redis Streams, each destination made for the test
with a random name and removed after it. What arrives is read the way a consumer reads it.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.conftest import serving
from tests.support import brokers
from tests.support.brokers import REDIS_URL, body_of, headers_of
from tests.support.daemon import WEBHOOK_KEY, Daemon, cli, events_json, wait_until, write_config
from tests.test_metrics import samples, value
from watcher.simulator import Simulator, SimulatorServer


@pytest.fixture(autouse=True)
def _brokers_up() -> None:
    brokers.require(4222, "NATS")
    brokers.require(5672, "RabbitMQ")
    brokers.require(6379, "Redis")


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=5, campaigns=2, leads=6) as pair:
        yield pair


def nats_sink(js: brokers.JetStream, name: str = "bus", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "type": "nats", "url": js.url, "subject": js.prefix + ".{type}", "secret": WEBHOOK_KEY,
            "retry_schedule": ["1s"], **overrides}  # fmt: skip


def amqp_sink(mq: brokers.Rabbit, name: str = "rabbit", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "type": "amqp", "url": mq.url, "exchange": mq.exchange, "secret": WEBHOOK_KEY,
            "retry_schedule": ["1s"], **overrides}  # fmt: skip


def redis_sink(stream: brokers.RedisStream, name: str = "stream", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "type": "redis", "url": stream.url, "stream": stream.key, "secret": WEBHOOK_KEY,
            "retry_schedule": ["1s"], **overrides}  # fmt: skip


def verified(messages: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """(webhook-id, event) for each message, every one verified as a consumer would verify it."""
    webhook = Webhook(WEBHOOK_KEY)
    return [(headers_of(m)["webhook-id"], webhook.verify(body_of(m), headers_of(m))) for m in messages]


def created_leads(messages: list[Any]) -> list[int]:
    return [e["data"]["lead"]["id"] for _id, e in verified(messages) if e["type"] == "lead.created"]


def test_every_change_reaches_all_three_brokers_once_and_in_order(tmp_path: Path, sim) -> None:
    """New leads reach JetStream, RabbitMQ and Redis once each, verified; one lead's changes keep their order."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    with brokers.jetstream() as js, brokers.rabbit() as mq, brokers.redis_stream() as rs:
        config = write_config(
            tmp_path,
            server.url,
            [nats_sink(js), amqp_sink(mq), redis_sink(rs)],
            leads={"updates": True, "track": ["score"]},
        )
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            new = simulator.add_leads(9, campaign)
            # Each change waits until the one before it was delivered, so none is folded into another.
            wait_until(lambda: len(rs.entries()) >= len(new), 30, "the new leads")
            changed = new[0]
            for score in (11, 12, 13):
                simulator.update_lead(changed, score=score)
                wait_until(lambda: len(rs.entries()) >= len(new) + score - 10, 30, f"the change to {score}")  # noqa: B023
            total = len(new) + 3
            wait_until(lambda: len(js.messages()) >= total and len(rs.entries()) >= total, 30, "every event")
            assert daemon.stop() == 0
        from_nats, from_redis, from_rabbit = js.messages(), rs.entries(), mq.messages()
    for messages in (from_nats, from_redis, from_rabbit):
        assert sorted(created_leads(messages)) == sorted(new)
        ids = [event_id for event_id, _ in verified(messages)]
        assert len(ids) == len(set(ids)) == total
        scores = [
            e["data"]["changes"]["score"]["to"]
            for _id, e in verified(messages)
            if e["type"] == "lead.updated" and e["data"]["lead"]["id"] == changed
        ]
        assert scores == [11, 12, 13]
    assert {m.headers["Nats-Msg-Id"] for m in from_nats} == {headers_of(m)["webhook-id"] for m in from_nats}
    rows = events_json(config, "--status", "delivered")
    assert {r["sink"] for r in rows} == {"bus", "rabbit", "stream"} and len(rows) == 3 * total


def test_send_test_and_check_connect_use_the_broker(tmp_path: Path, sim) -> None:
    """`send-test` publishes a confirmed watcher.test; `check --connect` does each broker's handshake
    and finds the destination, and names a missing stream or exchange (exit 1)."""
    _simulator, server = sim
    with brokers.jetstream() as js, brokers.rabbit() as mq, brokers.redis_stream() as rs:
        config = write_config(tmp_path, server.url, [nats_sink(js), amqp_sink(mq), redis_sink(rs)])
        for sink in ("bus", "rabbit", "stream"):
            result = cli("send-test", "-c", str(config), "--sink", sink)
            assert result.returncode == 0, result.stderr
            assert f"{sink}: accepted: confirmed by the broker in" in result.stdout
        assert [e["type"] for _id, e in verified(js.messages())] == ["watcher.test"]
        assert [e["data"] for _id, e in verified(mq.messages())] == [{"sink": "rabbit"}]
        result = cli("check", "-c", str(config), "--connect")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"sink bus: JetStream stream {js.stream} stores {js.prefix}.campaign.created" in result.stdout
        assert f"sink rabbit: exchange {mq.exchange} exists; publisher confirms on" in result.stdout
        assert f"sink stream: stream {rs.key} exists (1 entries)" in result.stdout
    # The stream and exchange are gone now.
    result = cli("check", "-c", str(config), "--connect")
    assert result.returncode == 1
    assert f"sink bus: cannot deliver (no JetStream stream stores subject {js.prefix}." in result.stdout
    assert f"sink rabbit: cannot deliver (exchange {mq.exchange} does not exist on the AMQP broker)" in result.stdout
    assert "guest" not in result.stdout + result.stderr


def test_dead_events_are_replayed_to_a_broker(tmp_path: Path, sim) -> None:
    """An entry Redis keeps refusing (the key is not a stream) dies after its schedule; once the key is
    fixed, `replay` sends it again with the same webhook-id; /metrics counts each outcome for the sink."""
    simulator, server = sim
    with brokers.redis_stream() as rs:
        brokers.asyncio.run(brokers._redis(REDIS_URL, "set", rs.key, "in the way"))
        port = brokers.free_port()
        config = write_config(
            tmp_path,
            server.url,
            [redis_sink(rs, retry_schedule=["1s"])],
            extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
        )
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            [lead] = simulator.add_leads(1, simulator.campaign_ids()[0])
            dead = wait_until(lambda: events_json(config, "--status", "dead"), 30, "the event to die")
            assert "holds something other than a stream" in dead[0]["last_error"]
            brokers.asyncio.run(brokers._redis(REDIS_URL, "delete", rs.key))
            result = cli("replay", "-c", str(config), "--all")
            assert result.returncode == 0, result.stderr
            wait_until(rs.entries, 20, "the replayed entry")
            # Per-sink metrics count a broker sink's outcomes as they do a webhook's.
            scraped = samples(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
            assert value(scraped, "watcher_deliveries_total", sink="stream", outcome="retry") == 1
            assert value(scraped, "watcher_deliveries_total", sink="stream", outcome="dead") == 1
            assert value(scraped, "watcher_deliveries_total", sink="stream", outcome="success") == 1
            assert daemon.stop() == 0
        [(event_id, event)] = verified(rs.entries())
    assert event_id == dead[0]["id"] and event["data"]["lead"]["id"] == lead


def test_refused_credentials_disable_the_sink_and_keep_its_events(tmp_path: Path, sim) -> None:
    """A wrong broker password is a loud failure that disables the sink with its events kept; the
    fixed password (SIGHUP) sends them, and the password never reaches a log line."""
    simulator, server = sim
    with brokers.own_redis(password=brokers.BROKER_PASSWORD) as redis_server:
        good = f"redis://:{brokers.BROKER_PASSWORD}@127.0.0.1:{redis_server.port}/0"
        rs = brokers.RedisStream(good, brokers.name("cw:"))
        secret = tmp_path / "redis-url"
        secret.write_text(good.replace(brokers.BROKER_PASSWORD, "wrong-" + brokers.BROKER_PASSWORD))
        sink = {**redis_sink(rs), "url_file": str(secret)}
        del sink["url"]
        config = write_config(tmp_path, server.url, [sink])
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            leads = simulator.add_leads(3, simulator.campaign_ids()[0])
            wait_until(lambda: "sink disabled" in daemon.log(), 30, "the sink to be disabled")
            status = json.loads(cli("status", "-c", str(config), "--json").stdout)
            [state] = [s for s in status["sinks"] if s["sink"] == "stream"]
            assert (state["pending"], state["dead"], state["disabled"]) == (3, 0, True)
            assert "refused the credentials" in state["disabled_reason"]
            secret.write_text(good)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: len(rs.entries()) >= 3, 30, "the kept events after the fix")
            assert daemon.stop() == 0
            log = daemon.log()
        assert sorted(created_leads(rs.entries())) == sorted(leads)
    assert "refused the credentials in the sink's url" in log
    assert brokers.BROKER_PASSWORD not in log
