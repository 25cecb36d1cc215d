"""The broker sinks against the real brokers on 127.0.0.1: what a consumer receives, and each refusal.

NATS JetStream (4222), RabbitMQ (5672, guest/guest) and Redis (6379) run on this machine and in CI;
servers with passwords are started by the tests that need them. Signatures are checked with the
independent `standardwebhooks` package, exactly as a consumer would.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from tests.support import brokers
from tests.support.brokers import AMQP_URL, NATS_URL, REDIS_URL, body_of, headers_of
from tests.support.daemon import WEBHOOK_KEY
from watcher.clock import FakeClock, SystemClock
from watcher.config import SinkConfig
from watcher.errors import DeliveryError, SinkGone
from watcher.events import Event, event_id
from watcher.sinks import build_sink
from watcher.sinks.broker import BrokerSink


def _event(n: int = 1, type_: str = "lead.created") -> Event:
    resource = f"lead:{n}"
    return Event(
        event_id(type_, resource, str(n)),
        type_,
        "2026-11-26T18:35:40.512Z",
        {"lead": {"id": n, "email": "ava.patel@example.com", "name": "Ava Pátel"}},
        resource,
    )


def _sink(config: SinkConfig, clock: Any = None) -> BrokerSink[Any]:
    sink = build_sink(config, clock=clock or SystemClock(), version="test")
    assert isinstance(sink, BrokerSink)
    return sink


def _deliver(config: SinkConfig, *events: Event, clock: Any = None) -> list[Any]:
    async def go() -> list[Any]:
        sink = _sink(config, clock)
        try:
            return [await sink.deliver([e]) for e in events]
        finally:
            await sink.aclose()

    return asyncio.run(go())


def _refused(config: SinkConfig, event: Event | None = None, clock: Any = None) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        _deliver(config, event or _event(), clock=clock)
    return caught.value


def _probe(config: SinkConfig) -> str:
    async def go() -> str:
        sink = _sink(config)
        try:
            return await sink.reach()
        finally:
            await sink.aclose()

    return asyncio.run(go())


def _verified(message: Any) -> dict[str, Any]:
    """What a consumer holding the sink's secret gets from a message: the verified event."""
    headers = headers_of(message)
    result: dict[str, Any] = Webhook(WEBHOOK_KEY).verify(body_of(message), headers)
    return result


@pytest.fixture
def nats_up() -> None:
    brokers.require(4222, "NATS")


@pytest.fixture
def amqp_up() -> None:
    brokers.require(5672, "RabbitMQ")


@pytest.fixture
def redis_up() -> None:
    brokers.require(6379, "Redis")


# --- what a consumer receives ---------------------------------------------------------------


def test_nats_message_is_the_webhook_body_signed_with_msg_id(nats_up: None) -> None:
    """JetStream stores the webhook body byte for byte, Nats-Msg-Id = webhook-id, and the signature verifies."""
    event = _event()
    with brokers.jetstream() as js:
        config = SinkConfig("bus", "nats", NATS_URL, secrets=(WEBHOOK_KEY,), subject=js.prefix + ".{type}")
        [attempt] = _deliver(config, event)
        [message] = js.messages()
    assert message.subject == f"{js.prefix}.lead.created"
    assert body_of(message) == event.body()
    headers = headers_of(message)
    assert headers["Nats-Msg-Id"] == headers["webhook-id"] == event.id
    assert headers["type"] == "lead.created"
    assert _verified(message) == {"type": "lead.created", "timestamp": event.timestamp, "data": dict(event.data)}
    assert attempt.status is None and attempt.response_excerpt == ""


def test_amqp_message_is_persistent_with_id_type_and_signature(amqp_up: None) -> None:
    """RabbitMQ gets a persistent application/json message: message_id and type set, headers signed."""
    event = _event(type_="lead.updated")
    with brokers.rabbit() as mq:
        config = SinkConfig("rabbit", "amqp", AMQP_URL, secrets=(WEBHOOK_KEY,), exchange=mq.exchange)
        _deliver(config, event)
        [message] = mq.messages()
    assert message.routing_key == "lead.updated"
    assert (message.message_id, message.type, message.content_type) == (event.id, "lead.updated", "application/json")
    assert message.delivery_mode == 2
    assert body_of(message) == event.body()
    assert headers_of(message)["webhook-id"] == event.id
    assert _verified(message)["type"] == "lead.updated"


def test_redis_entry_holds_the_body_and_headers_as_fields(redis_up: None) -> None:
    """XADD writes the body in the field `body` and each header as a field; the signature verifies."""
    event = _event()
    with brokers.redis_stream() as stream:
        config = SinkConfig("stream", "redis", REDIS_URL, secrets=(WEBHOOK_KEY,), stream=stream.key)
        [attempt] = _deliver(config, event)
        [entry] = stream.entries()
    fields = set(entry[1])
    assert fields == {b"body", b"webhook-id", b"webhook-timestamp", b"webhook-signature", b"type"}
    assert body_of(entry) == event.body()
    assert _verified(entry)["data"]["lead"]["id"] == 1
    assert attempt.response_excerpt == ""


def test_without_a_secret_no_signature_is_sent(redis_up: None) -> None:
    """A broker sink's secret is optional: without one there is no webhook-signature field."""
    with brokers.redis_stream() as stream:
        _deliver(SinkConfig("stream", "redis", REDIS_URL, stream=stream.key), _event())
        [entry] = stream.entries()
    assert set(entry[1]) == {b"body", b"webhook-id", b"webhook-timestamp", b"type"}


def test_include_pii_false_leaves_personal_fields_out(redis_up: None) -> None:
    """A broker sink's payload goes through the same PII filter as a webhook's."""
    with brokers.redis_stream() as stream:
        _deliver(SinkConfig("stream", "redis", REDIS_URL, stream=stream.key, include_pii=False), _event())
        [entry] = stream.entries()
    assert b"ava.patel" not in body_of(entry)


def test_redis_maxlen_trims_the_stream_approximately(redis_up: None) -> None:
    """With `maxlen` the stream is trimmed (approximately: whole nodes of ~100 entries go at once)."""
    with brokers.redis_stream() as stream:
        config = SinkConfig("stream", "redis", REDIS_URL, stream=stream.key, maxlen=10)
        _deliver(config, *(_event(n) for n in range(300)))
        kept = len(stream.entries())
    assert 10 <= kept < 300


# --- at least once, and JetStream's duplicate window ----------------------------------------


def test_nats_resend_inside_the_duplicate_window_is_stored_once(nats_up: None) -> None:
    """The same event published twice (a retry after a lost ack) is one message in the stream."""
    event = _event()
    with brokers.jetstream() as js:
        config = SinkConfig("bus", "nats", NATS_URL, subject=js.prefix + ".{type}")
        first, second = _deliver(config, event, event)
        assert len(js.messages()) == 1
    assert first.response_excerpt == ""
    assert second.response_excerpt == f"a duplicate: stream {js.stream} already had this id (seq 1)"


# --- refusals: each a clear, failed attempt -------------------------------------------------


def test_nats_subject_no_stream_stores_is_a_clear_error(nats_up: None) -> None:
    """Publishing where no stream listens fails (no silent publish into nothing), and the probe says so first."""
    config = SinkConfig("bus", "nats", NATS_URL, subject=brokers.name("nostream") + ".{type}")
    error = _refused(config)
    assert str(error) == f"no JetStream stream stores subject {config.subject.replace('{type}', 'lead.created')}"
    with pytest.raises(DeliveryError, match="no JetStream stream stores subject"):
        _probe(config)


def test_nats_probe_names_the_stream_storing_every_subject(nats_up: None) -> None:
    with brokers.jetstream() as js:
        config = SinkConfig("bus", "nats", NATS_URL, subject=js.prefix + ".{type}", events=frozenset({"lead.created"}))
        assert _probe(config) == f"JetStream stream {js.stream} stores {js.prefix}.lead.created"


def test_amqp_unroutable_message_is_a_failed_attempt(amqp_up: None) -> None:
    """An exchange with no queue bound for the routing key returns the message: the attempt fails."""
    with brokers.rabbit(bind=None) as mq:
        config = SinkConfig("rabbit", "amqp", AMQP_URL, exchange=mq.exchange)
        error = _refused(config)
        assert mq.messages() == []
    assert "returned by the broker (NO_ROUTE)" in str(error)
    assert "routing key lead.created" in str(error)


def test_amqp_missing_exchange_is_named_and_probed(amqp_up: None) -> None:
    """The exchange is checked passively (never declared): a missing one is a clear error."""
    missing = brokers.name("cw-missing-")
    config = SinkConfig("rabbit", "amqp", AMQP_URL, exchange=missing)
    assert str(_refused(config)) == f"exchange {missing} does not exist on the AMQP broker"
    with pytest.raises(DeliveryError, match=f"exchange {missing} does not exist"):
        _probe(config)


def test_amqp_exchange_deleted_while_connected_fails_then_recovers(amqp_up: None) -> None:
    """The channel the broker closes over a deleted exchange is replaced: once it is back, delivery works."""

    async def go(mq: brokers.Rabbit) -> list[str]:
        sink = _sink(SinkConfig("rabbit", "amqp", AMQP_URL, exchange=mq.exchange))
        seen = []
        try:
            await sink.deliver([_event(1)])
            await brokers._amqp_setup(AMQP_URL, mq.exchange, mq.queue, None, delete=True)
            for n in (2, 3):
                try:
                    await sink.deliver([_event(n)])
                except DeliveryError as exc:
                    seen.append(str(exc))
            await brokers._amqp_setup(AMQP_URL, mq.exchange, mq.queue, "#", delete=False)
            sink._retry_at = float("-inf")  # the backoff pause is tested elsewhere; skip waiting it out
            await sink.deliver([_event(4)])
        finally:
            await sink.aclose()
        return seen

    with brokers.rabbit() as mq:
        errors = asyncio.run(go(mq))
        got = [m.message_id for m in mq.messages()]
    assert got == [_event(4).id]  # the first went to the queue that was deleted with the exchange
    assert errors and all("does not exist" in e or "next connection attempt" in e for e in errors)


def test_redis_key_of_another_type_is_named(redis_up: None) -> None:
    with brokers.redis_stream() as stream:
        asyncio.run(brokers._redis(REDIS_URL, "set", stream.key, "not a stream"))
        config = SinkConfig("stream", "redis", REDIS_URL, stream=stream.key)
        assert str(_refused(config)) == f"key {stream.key} holds something other than a stream"
        with pytest.raises(DeliveryError, match="holds a string, not a stream"):
            _probe(config)


# --- authentication: a refusal disables the sink (events kept) and never shows the password ----


def test_nats_refused_credentials_disable_the_sink_without_leaking_them(tmp_path: Path) -> None:
    with brokers.own_nats(tmp_path, password=brokers.BROKER_PASSWORD) as server:
        url = f"nats://watcher:wrong-{brokers.BROKER_PASSWORD}@127.0.0.1:{server.port}"
        error = _refused(SinkConfig("bus", "nats", url, subject="x.{type}"))
    assert isinstance(error, SinkGone)
    assert "refused the credentials" in str(error) and brokers.BROKER_PASSWORD not in str(error)


def test_nats_subject_the_user_may_not_publish_disables_the_sink(tmp_path: Path) -> None:
    """A permissions violation (sent out of band; the publish itself only times out) is named and
    disables the sink: retrying cannot help until someone grants the subject."""
    port = brokers.free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        "authorization { users = [\n"
        f'  {{user: admin, password: "{brokers.BROKER_PASSWORD}"}}\n'
        f'  {{user: app, password: "{brokers.BROKER_PASSWORD}", permissions: {{publish: {{deny: ["cw.>"]}}}}}}\n'
        "] }\n"
    )
    server = brokers.OwnServer([brokers.binary("nats-server", "/usr/sbin/nats-server"), "-c", str(conf)], port)
    with server, brokers.jetstream(f"nats://admin:{brokers.BROKER_PASSWORD}@127.0.0.1:{port}") as js:
        url = f"nats://app:{brokers.BROKER_PASSWORD}@127.0.0.1:{port}"
        error = _refused(SinkConfig("bus", "nats", url, subject="cw.x.{type}", timeout=1.0))
        assert js.count() == 0
    assert isinstance(error, SinkGone)
    assert 'permissions violation for publish to "cw.x.lead.created"' in str(error)
    assert brokers.BROKER_PASSWORD not in str(error)


def test_redis_refused_credentials_disable_the_sink_without_leaking_them() -> None:
    with brokers.own_redis(password=brokers.BROKER_PASSWORD) as server:
        url = f"redis://:wrong-{brokers.BROKER_PASSWORD}@127.0.0.1:{server.port}/0"
        error = _refused(SinkConfig("stream", "redis", url, stream="s"))
    assert isinstance(error, SinkGone)
    assert "refused the credentials" in str(error) and brokers.BROKER_PASSWORD not in str(error)


def test_redis_acl_user_without_xadd_disables_the_sink() -> None:
    """A least-privilege ACL user (no CLIENT SETNAME needed to connect) without XADD: named, and final."""
    with brokers.own_redis() as server:
        admin = f"redis://127.0.0.1:{server.port}/0"
        rules = ["on", f">{brokers.BROKER_PASSWORD}", "~*", "+@read", "+ping"]
        asyncio.run(brokers._redis(admin, "execute_command", "ACL", "SETUSER", "reader", *rules))
        url = f"redis://reader:{brokers.BROKER_PASSWORD}@127.0.0.1:{server.port}/0"
        config = SinkConfig("stream", "redis", url, stream="s")
        assert _probe(config) == "stream s does not exist yet: the first event creates it"
        error = _refused(config)
    assert isinstance(error, SinkGone)
    assert "no permissions to run the 'xadd' command" in str(error)


def test_amqp_refused_credentials_disable_the_sink_without_leaking_them(amqp_up: None) -> None:
    url = f"amqp://guest:wrong-{brokers.BROKER_PASSWORD}@127.0.0.1:5672/"
    error = _refused(SinkConfig("rabbit", "amqp", url, exchange="amq.topic"))
    assert isinstance(error, SinkGone)
    assert "ACCESS_REFUSED" in str(error) and brokers.BROKER_PASSWORD not in str(error)


# --- a broker that is down or never answers -------------------------------------------------


@contextmanager
def _silent_listener() -> Iterator[tuple[int, Callable[[], int]]]:
    """A TCP port that accepts connections and never says a word (a hung broker)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], lambda: len(held)
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.parametrize(
    ("kind", "url", "where"),
    [
        ("nats", "nats://127.0.0.1:{port}", {"subject": "x.{type}"}),
        ("amqp", "amqp://guest:guest@127.0.0.1:{port}/", {"exchange": "x"}),
        ("redis", "redis://127.0.0.1:{port}/0", {"stream": "x"}),
    ],
)
def test_a_broker_that_never_answers_costs_one_timeout_then_backs_off(kind: str, url: str, where: Any) -> None:
    """A silent broker fails the attempt within `timeout`; the next attempt fails at once (backoff)."""
    clock = FakeClock()

    async def go(port: int) -> tuple[float, str, float, str]:
        sink = _sink(SinkConfig("hung", kind, url.format(port=port), timeout=0.5, **where), clock)  # type: ignore[arg-type]
        try:
            started = time.monotonic()
            with pytest.raises(DeliveryError) as first:
                await sink.deliver([_event()])
            took = time.monotonic() - started
            started = time.monotonic()
            with pytest.raises(DeliveryError) as second:
                await sink.deliver([_event()])
            return took, str(first.value), time.monotonic() - started, str(second.value)
        finally:
            await sink.aclose()

    with _silent_listener() as (port, accepted):
        took, first, again, second = asyncio.run(go(port))
        assert accepted() >= 1
    assert 0.4 <= took < 3.0, took
    assert (first.startswith("no ") and "within 0.5s" in first) or "while connecting" in first, first
    assert again < 0.1 and "next connection attempt in" in second


def test_connection_backoff_doubles_while_the_broker_stays_away(redis_up: None) -> None:
    """Failed connection attempts pause 1 s, then 2 s, … (on the injected clock); inside a pause an
    attempt fails at once without touching the network."""
    clock = FakeClock()
    port = brokers.free_port()  # nothing listens there

    async def go() -> list[str]:
        sink = _sink(SinkConfig("s", "redis", f"redis://127.0.0.1:{port}/0", stream="x"), clock)
        said = []
        try:
            for wait in (0.0, 0.5, 0.6, 1.0, 1.0):
                clock.advance(wait)
                try:
                    await sink.deliver([_event()])
                except DeliveryError as exc:
                    said.append(str(exc))
        finally:
            await sink.aclose()
        return said

    said = asyncio.run(go())
    assert len(said) == 5
    assert all(said[i].startswith("cannot reach the Redis server") for i in (0, 2, 4)), said
    assert said[1].endswith("; next connection attempt in 0.5s")
    assert said[3].endswith("; next connection attempt in 1.0s")
