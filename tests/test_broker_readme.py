"""The README's broker consumer snippets run as printed against the real brokers and get what the sinks publish.

Each snippet is taken from the README, pointed at a destination made for the test (and the
suite's webhook key), and run until it has handled the events a real sink published, a resend
of one of them included: it must verify each signature and handle each event once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from tests.support import brokers
from tests.support.brokers import AMQP_URL, NATS_URL, REDIS_URL
from tests.support.daemon import WEBHOOK_KEY
from tests.test_broker_sinks import _event
from watcher.clock import SystemClock
from watcher.config import SinkConfig
from watcher.sinks import build_sink

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet(marker: str, replace: dict[str, str]) -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    [code] = [b for b in blocks if marker in b]
    code = code.replace('"whsec_…"', repr(WEBHOOK_KEY))
    for old, new in replace.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def _run(config: SinkConfig, consume: Callable[[Any], Coroutine[Any, Any, None]]) -> list[tuple[str, Any]]:
    """Publish three events and a resend of the first through the real sink, then let the snippet
    consume until it has handled three (or five seconds pass) and a moment more for a duplicate."""
    events = [_event(n) for n in (1, 2, 3)]

    async def go() -> list[tuple[str, Any]]:
        sink = build_sink(config, clock=SystemClock(), version="test")
        try:
            for event in [*events, events[0]]:
                await sink.deliver([event])
        finally:
            await sink.aclose()
        handled: list[tuple[str, Any]] = []
        task = asyncio.create_task(consume(lambda event_id, event: handled.append((event_id, event))))
        try:
            async with asyncio.timeout(10):
                while len(handled) < 3:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # room for a duplicate to show up, were the snippet to let one through
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return handled

    handled = asyncio.run(go())
    assert [event_id for event_id, _ in handled] == [e.id for e in events]
    assert [event["data"]["lead"]["id"] for _, event in handled] == [1, 2, 3]
    return handled


def test_nats_consumer_snippet(tmp_path: Path) -> None:
    brokers.require(4222, "NATS")
    with brokers.jetstream() as js:
        namespace = _snippet(
            "import nats",
            {
                '"convertr.>"': repr(js.prefix + ".>"),
                '"CONVERTR"': repr(js.stream),
                '"nats://127.0.0.1:4222"': repr(NATS_URL),
            },
        )
        _run(
            SinkConfig("bus", "nats", NATS_URL, secrets=(WEBHOOK_KEY,), subject=js.prefix + ".{type}"),
            namespace["consume"],
        )


def test_amqp_consumer_snippet() -> None:
    brokers.require(5672, "RabbitMQ")
    with brokers.rabbit() as mq:
        namespace = _snippet(
            "import aio_pika", {'"crm-sync"': repr(mq.queue), '"amqp://guest:guest@127.0.0.1:5672/"': repr(AMQP_URL)}
        )
        _run(SinkConfig("rabbit", "amqp", AMQP_URL, secrets=(WEBHOOK_KEY,), exchange=mq.exchange), namespace["consume"])


def test_redis_consumer_snippet_dedupes_a_resend() -> None:
    """The resend is a second entry in the stream; the snippet hands the event on once."""
    brokers.require(6379, "Redis")
    with brokers.redis_stream() as rs:
        group = brokers.name("g")
        namespace = _snippet("import redis", {'"convertr:events"': repr(rs.key), '"crm-sync"': repr(group)})
        try:
            config = SinkConfig("stream", "redis", REDIS_URL, secrets=(WEBHOOK_KEY,), stream=rs.key)
            _run(config, namespace["consume"])
            assert len(rs.entries()) == 4
        finally:
            asyncio.run(_cleanup(group))


async def _cleanup(group: str) -> None:
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{group}:seen:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.mark.parametrize("marker", ["import nats", "import aio_pika", "import redis"])
def test_each_snippet_verifies_with_the_sinks_secret(marker: str) -> None:
    """Every consumer snippet checks the signature with a Standard Webhooks library."""
    [code] = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if marker in b]
    assert 'Webhook("whsec_…")' in code and "webhook.verify(" in code
