from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from watcher.clock import FakeClock
from watcher.metrics import Metrics, serve, status_class

INTERVALS = {"leads": 60.0, "campaigns": 300.0}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


async def with_server(
    metrics: Metrics,
    health: Callable[[], tuple[bool, str]],
    body: Callable[[httpx.AsyncClient], Awaitable[None]],
) -> None:
    server = await serve(metrics, "127.0.0.1", 0, health)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            await body(client)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("status", "label"),
    [(200, "2xx"), (204, "2xx"), (301, "3xx"), (429, "4xx"), (503, "5xx"), (None, "error")],
)
def test_status_class(status: int | None, label: str) -> None:
    """HTTP statuses collapse into bounded classes; no answer is "error"."""
    assert status_class(status) == label


def test_metrics_endpoint_exposes_counts_over_a_real_socket() -> None:
    """GET /metrics returns the text exposition with every recorded count."""
    clock = FakeClock()
    m = Metrics(start=clock.now(), streams=["leads", "campaigns"], sinks=["crm", "slack"])
    m.poll_finished("leads", ok=True, duration=0.3, fetched=5, now=clock.now())
    m.poll_finished("leads", ok=False, duration=1.2, fetched=0, now=clock.now())
    m.poll_finished("campaigns", ok=True, duration=0.1, fetched=2, now=clock.now())
    m.api_response("/api/leads", 200)
    m.api_response("/api/leads", 200)
    m.api_response("/api/leads", 503)
    m.api_response("/api/token", None)
    m.event_detected("lead.created")
    m.event_detected("lead.created", 2)
    m.delivery("crm", "success")
    m.delivery("crm", "retry")
    m.delivery("slack", "dead")
    m.set_outbox("crm", pending=4, oldest_age=42.5)
    m.set_cursor("leads", cursor_ts=clock.now() - 90, now=clock.now())

    async def check(client: httpx.AsyncClient) -> None:
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        p = samples(r.text)
        assert value(p, "watcher_poll_runs_total", stream="leads", outcome="ok") == 1
        assert value(p, "watcher_poll_runs_total", stream="leads", outcome="error") == 1
        assert value(p, "watcher_poll_runs_total", stream="campaigns", outcome="error") == 0
        assert value(p, "watcher_poll_duration_seconds_count", stream="leads") == 2
        assert value(p, "watcher_poll_duration_seconds_sum", stream="leads") == pytest.approx(1.5)
        assert value(p, "watcher_records_fetched_total", stream="leads") == 5
        assert value(p, "watcher_last_successful_poll_timestamp_seconds", stream="leads") == clock.now()
        assert value(p, "watcher_api_requests_total", endpoint="/api/leads", code_class="2xx") == 2
        assert value(p, "watcher_api_requests_total", endpoint="/api/leads", code_class="5xx") == 1
        assert value(p, "watcher_api_requests_total", endpoint="/api/token", code_class="error") == 1
        assert value(p, "watcher_events_detected_total", type="lead.created") == 3
        assert value(p, "watcher_deliveries_total", sink="crm", outcome="success") == 1
        assert value(p, "watcher_deliveries_total", sink="crm", outcome="retry") == 1
        assert value(p, "watcher_deliveries_total", sink="crm", outcome="dead") == 0
        assert value(p, "watcher_deliveries_total", sink="slack", outcome="dead") == 1
        assert value(p, "watcher_outbox_pending", sink="crm") == 4
        assert value(p, "watcher_outbox_oldest_pending_age_seconds", sink="crm") == 42.5
        assert value(p, "watcher_outbox_pending", sink="slack") == 0
        assert value(p, "watcher_cursor_lag_seconds", stream="leads") == 90
        assert [v for (name, _), v in p.items() if name == "watcher_build_info"] == [1]
        assert value(p, "watcher_outbox_dead", sink="crm") == 0
        assert value(p, "watcher_leader", state="sqlite") == 1  # the only daemon on an SQLite file leads it
        assert value(p, "process_resident_memory_bytes") > 10_000_000  # the process collector: this process
        # Every series is the watcher's own or the process collector's; no stray registry leaks in.
        assert all(name.startswith(("watcher_", "process_")) for name, _ in p)

    asyncio.run(with_server(m, lambda: m.health(clock.now(), INTERVALS), check))


def test_leader_gauge_follows_the_role_of_a_shared_state() -> None:
    """On PostgreSQL a daemon starts standing by (0) and leadership sets 1 and back to 0."""
    m = Metrics(start=0.0, state="convertr_acme")

    def leader() -> float:
        return value(samples(m.exposition().decode()), "watcher_leader", state="convertr_acme")

    assert leader() == 0
    m.set_leader(True)
    assert leader() == 1
    m.set_leader(False)
    assert leader() == 0


def test_healthz_turns_503_when_a_stream_misses_three_intervals() -> None:
    """/healthz is 200 while every stream succeeded within three intervals, then 503 with the reason."""
    clock = FakeClock()
    m = Metrics(start=clock.now())

    async def check(client: httpx.AsyncClient) -> None:
        r = await client.get("/healthz")
        assert (r.status_code, r.text) == (200, "ok\n")
        m.poll_finished("leads", ok=True, duration=1, fetched=0, now=clock.now())
        m.poll_finished("campaigns", ok=True, duration=1, fetched=0, now=clock.now())
        clock.advance(180)
        assert (await client.get("/healthz")).status_code == 200
        m.poll_finished("leads", ok=False, duration=1, fetched=0, now=clock.now())
        clock.advance(1)
        r = await client.get("/healthz")
        assert r.status_code == 503
        assert r.text == "leads: last successful poll 181s ago (limit 180s)\n"
        m.poll_finished("leads", ok=True, duration=1, fetched=0, now=clock.now())
        assert (await client.get("/healthz")).status_code == 200

    asyncio.run(with_server(m, lambda: m.health(clock.now(), INTERVALS), check))


def test_never_polled_stream_is_healthy_only_within_three_intervals_of_start() -> None:
    """A stream without any success yet is given three intervals from start."""
    clock = FakeClock()
    m = Metrics(start=clock.now())
    assert m.health(clock.now() + 180, {"leads": 60}) == (True, "ok")
    ok, reason = m.health(clock.now() + 181, {"leads": 60})
    assert not ok
    assert reason == "leads: no successful poll in 181s since start"


def test_health_names_every_failing_stream() -> None:
    """Several stale streams are all reported, in a stable order."""
    clock = FakeClock()
    m = Metrics(start=clock.now())
    m.poll_finished("leads", ok=True, duration=1, fetched=0, now=clock.now())
    ok, reason = m.health(clock.now() + 1000, INTERVALS)
    assert not ok
    assert reason.startswith("campaigns: ") and "; leads: " in reason


def test_other_paths_and_methods() -> None:
    """Unknown paths are 404, writes are 405, HEAD has no body, a query string is ignored."""
    m = Metrics(start=0)

    async def check(client: httpx.AsyncClient) -> None:
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/metrics/x")).status_code == 404
        assert (await client.post("/metrics", content=b"x")).status_code == 405
        head = await client.head("/metrics")
        assert head.status_code == 200 and head.content == b""
        assert (await client.get("/healthz?verbose=1")).status_code == 200

    asyncio.run(with_server(m, lambda: (True, "ok"), check))


def test_malformed_request_and_failing_health_check() -> None:
    """Garbage gets 400 and a raising health function answers 500 instead of dropping the client."""
    m = Metrics(start=0)

    def broken() -> tuple[bool, str]:
        raise RuntimeError("health check crashed")

    async def raw(port: int, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        reply = await reader.read()
        writer.close()
        await writer.wait_closed()
        return reply

    async def main() -> None:
        server = await serve(m, "127.0.0.1", 0, broken)
        port = server.sockets[0].getsockname()[1]
        try:
            assert (await raw(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            assert (await raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 500 ")
            assert (await raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_unknown_delivery_outcome_is_refused() -> None:
    """Outcome labels stay a fixed set."""
    with pytest.raises(ValueError):
        Metrics(start=0).delivery("crm", "exploded")


def test_registries_are_independent() -> None:
    """Two Metrics objects never share counts (and never touch the global registry)."""
    a, b = Metrics(start=0), Metrics(start=0)
    a.event_detected("lead.created")
    pa, pb = samples(a.exposition().decode()), samples(b.exposition().decode())
    assert value(pa, "watcher_events_detected_total", type="lead.created") == 1
    assert ("watcher_events_detected_total", frozenset({("type", "lead.created")})) not in pb
