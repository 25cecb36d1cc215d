"""Prometheus metrics and a health verdict, served on a small loopback HTTP endpoint.

The metrics live in their own CollectorRegistry so tests and several daemons in one process
never collide. Label values are bounded sets (stream, sink, event type, endpoint template),
never lead or campaign ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from watcher import __version__

log = logging.getLogger(__name__)

DELIVERY_OUTCOMES = ("success", "retry", "dead", "disabled")
POLL_OUTCOMES = ("ok", "error")
HEALTH_INTERVALS = 3
# Polls take from milliseconds (nothing new) to minutes (a backfill walking many pages).
POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MAX_REQUEST_BYTES = 8192
REQUEST_DEADLINE = 10.0
HEADER_DEADLINE = 2.0  # a scraper sends its few header lines at once; a slow one is a slowloris
# Connections served at once; more are closed on arrival. A scraper needs one, so a flood of idle
# connections costs at most this many handlers and buffers, whoever can reach the port.
MAX_CONNECTIONS = 16


def status_class(status: int | None) -> str:
    """ "2xx", "4xx", ... for an HTTP status; "error" when no answer came."""
    if status is None or not 100 <= status <= 599:
        return "error"
    return f"{status // 100}xx"


class PollMetrics(Protocol):
    """What the walks report: all a poller needs of the metrics, so a test can pass its own."""

    def poll_finished(self, stream: str, ok: bool, duration: float, fetched: int, now: float) -> None: ...
    def event_detected(self, event_type: str, count: int = 1) -> None: ...
    def set_cursor(self, stream: str, cursor_ts: float, now: float) -> None: ...
    def set_unreadable(self, count: int) -> None: ...
    def page_narrowed(self, cause: str) -> None: ...


class DeliveryMetrics(Protocol):
    """What the delivery engine reports: all a dispatcher needs of the metrics."""

    def delivery(self, sink: str, outcome: str) -> None: ...
    def set_outbox(self, sink: str, pending: int, oldest_age: float) -> None: ...


class Metrics(PollMetrics, DeliveryMetrics):
    """Every watcher_ metric; the daemon calls these methods, /metrics exposes them. Subclassing the
    two protocols has mypy check that this class is what the poller and the dispatcher take."""

    def __init__(
        self, start: float, streams: Iterable[str] = (), sinks: Iterable[str] = (), *, state: str = "sqlite"
    ) -> None:
        """`start` is the daemon's start time (Unix seconds): never-polled streams are judged from it.
        `state` names the state this daemon works on (the PostgreSQL schema), for watcher_leader."""
        self.start = start
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.poll_runs = Counter(
            "watcher_poll_runs", "Polls finished, by stream and outcome.", ["stream", "outcome"], registry=r
        )
        self.poll_duration = Histogram(
            "watcher_poll_duration_seconds",
            "Duration of a poll.",
            ["stream"],
            buckets=POLL_BUCKETS,
            registry=r,
        )
        self.records_fetched = Counter("watcher_records_fetched", "Records read from the API.", ["stream"], registry=r)
        self.last_success = Gauge(
            "watcher_last_successful_poll_timestamp_seconds",
            "Unix time of the last successful poll.",
            ["stream"],
            registry=r,
        )
        self.cursor = Gauge(
            "watcher_cursor_timestamp_seconds", "The stream's cursor as Unix time.", ["stream"], registry=r
        )
        self.cursor_lag = Gauge(
            "watcher_cursor_lag_seconds", "How far the cursor trails the wall clock.", ["stream"], registry=r
        )
        self.unreadable_leads = Gauge(
            "watcher_unreadable_leads",
            "Leads the API failed to serialise: skipped by the walks and retried slowly.",
            registry=r,
        )
        self.pages_narrowed = Counter(
            "watcher_walk_pages_narrowed",
            "Lead pages that could not be read whole and were split, by cause (too_large, server_fault, malformed).",
            ["cause"],
            registry=r,
        )
        self.budget_wait = Counter(
            "watcher_api_budget_wait_seconds",
            "Seconds requests waited for room in the request budget (convertr.request_budget): throttled.",
            registry=r,
        )
        self.api_requests = Counter(
            "watcher_api_requests",
            "Convertr API requests by endpoint and status class.",
            ["endpoint", "code_class"],
            registry=r,
        )
        self.events_detected = Counter(
            "watcher_events_detected", "Change events detected, by type.", ["type"], registry=r
        )
        self.deliveries = Counter(
            "watcher_deliveries", "Delivery attempts by sink and outcome.", ["sink", "outcome"], registry=r
        )
        self.outbox_pending = Gauge("watcher_outbox_pending", "Events waiting for delivery.", ["sink"], registry=r)
        self.outbox_oldest_age = Gauge(
            "watcher_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending event (0 when none).",
            ["sink"],
            registry=r,
        )
        # A state, not a count: an alert on a counter of "disabled" outcomes would clear itself an
        # hour later while the sink stays off.
        self.sink_disabled = Gauge(
            "watcher_sink_disabled",
            "1 while the sink is disabled (410, revoked Slack hook) until `replay --sink` or a new URL.",
            ["sink"],
            registry=r,
        )
        # Exported so a rule can compare the request rate with the budget this daemon was given,
        # which an operator lowers when several watchers share one Convertr account.
        self.request_budget = Gauge(
            "watcher_api_request_budget",
            "Convertr API requests this daemon allows itself per rolling 5 minutes (convertr.request_budget).",
            registry=r,
        )
        # Events left under a sink no longer in the configuration (renamed or removed): nothing
        # sends them until `replay --sink NEW --from-sink OLD` moves them.
        self.stranded = Gauge(
            "watcher_outbox_stranded",
            "Pending and dead deliveries of a sink that is no longer configured.",
            ["sink"],
            registry=r,
        )
        # When the configuration in force was loaded, and whether the last SIGHUP was refused.
        self.config_loaded = Gauge(
            "watcher_config_loaded_timestamp_seconds", "When the running configuration was loaded.", registry=r
        )
        self.config_reload_failed = Gauge(
            "watcher_config_reload_failed", "1 when the last reload was refused (the old config runs on).", registry=r
        )
        # The dead deliveries waiting now: the count of attempts that died only rises, so an alert on
        # its increase resolves while dead events still wait for a replay.
        self.outbox_dead = Gauge(
            "watcher_outbox_dead",
            "Deliveries that ran out of retries or max_age and wait for a replay.",
            ["sink"],
            registry=r,
        )
        # 1 while this daemon leads its state, 0 while it stands by. On SQLite the daemon that holds
        # the file's lock is the only one, so it starts at 1; on PostgreSQL leadership sets it. The
        # `state` label (the schema) groups the daemons of one state, so "no leader" is one alert per state.
        self.leader = Gauge(
            "watcher_leader", "1 while this daemon leads its state, 0 while it stands by.", ["state"], registry=r
        )
        self.state = state
        self.leader.labels(state=state).set(1 if state == "sqlite" else 0)
        # process_resident_memory_bytes and friends, to watch memory against the unit's MemoryMax.
        ProcessCollector(registry=r)
        build = Gauge("watcher_build_info", "Version information.", ["version", "python"], registry=r)
        build.labels(version=__version__, python=platform.python_version()).set(1)

        self._last_ok: dict[str, float] = {}
        self._stranded_seen: set[str] = set()
        # Label sets exist from the start, so a rate() over "no failures yet" reads 0, not nothing.
        for stream in streams:
            for outcome in POLL_OUTCOMES:
                self.poll_runs.labels(stream=stream, outcome=outcome)
            self.records_fetched.labels(stream=stream)
        for cause in ("too_large", "server_fault", "malformed"):
            self.pages_narrowed.labels(cause=cause)
        for sink in sinks:
            for outcome in DELIVERY_OUTCOMES:
                self.deliveries.labels(sink=sink, outcome=outcome)
            self.set_outbox(sink, 0, 0.0)
            self.sink_disabled.labels(sink=sink).set(0)
            self.outbox_dead.labels(sink=sink).set(0)

    def set_leader(self, leading: bool) -> None:
        self.leader.labels(state=self.state).set(1 if leading else 0)

    def poll_finished(self, stream: str, ok: bool, duration: float, fetched: int, now: float) -> None:
        """Record one poll of `stream` that ended at `now` (Unix seconds)."""
        self.poll_runs.labels(stream=stream, outcome="ok" if ok else "error").inc()
        self.poll_duration.labels(stream=stream).observe(max(0.0, duration))
        if fetched:
            self.records_fetched.labels(stream=stream).inc(fetched)
        if ok:
            self._last_ok[stream] = now
            self.last_success.labels(stream=stream).set(now)

    def api_response(self, endpoint: str, status: int | None) -> None:
        """Count one API request; `endpoint` is a template ("/api/leads"), `status` None on no answer."""
        self.api_requests.labels(endpoint=endpoint, code_class=status_class(status)).inc()

    def event_detected(self, event_type: str, count: int = 1) -> None:
        self.events_detected.labels(type=event_type).inc(count)

    def delivery(self, sink: str, outcome: str) -> None:
        """Count one delivery attempt: success, retry (failed, will retry), dead, disabled."""
        if outcome not in DELIVERY_OUTCOMES:
            raise ValueError(f"unknown delivery outcome {outcome!r}")
        self.deliveries.labels(sink=sink, outcome=outcome).inc()

    def set_outbox(self, sink: str, pending: int, oldest_age: float) -> None:
        self.outbox_pending.labels(sink=sink).set(pending)
        self.outbox_oldest_age.labels(sink=sink).set(max(0.0, oldest_age) if pending else 0.0)

    def set_dead(self, sink: str, dead: int) -> None:
        self.outbox_dead.labels(sink=sink).set(dead)

    def set_unreadable(self, count: int) -> None:
        self.unreadable_leads.set(count)

    def page_narrowed(self, cause: str) -> None:
        self.pages_narrowed.labels(cause=cause).inc()

    def budget_waited(self, seconds: float) -> None:
        self.budget_wait.inc(max(0.0, seconds))

    def set_stranded(self, counts: Mapping[str, int]) -> None:
        """The stranded backlog per unconfigured sink; a sink drained or configured again reads 0."""
        for sink in self._stranded_seen - set(counts):
            self.stranded.labels(sink=sink).set(0)
        for sink, n in counts.items():
            self.stranded.labels(sink=sink).set(n)
        self._stranded_seen |= set(counts)

    def config_applied(self, now: float, ok: bool) -> None:
        if ok:
            self.config_loaded.set(now)
        self.config_reload_failed.set(0 if ok else 1)

    def add_sink(self, sink: str) -> None:
        """Label sets for a sink added by a reload, as the constructor makes them for the first ones."""
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(sink=sink, outcome=outcome)
        self.sink_disabled.labels(sink=sink).set(0)
        self.outbox_dead.labels(sink=sink).set(0)

    def set_sink_disabled(self, sink: str, disabled: bool) -> None:
        self.sink_disabled.labels(sink=sink).set(1 if disabled else 0)

    def set_request_budget(self, requests: int) -> None:
        self.request_budget.set(requests)

    def set_cursor(self, stream: str, cursor_ts: float, now: float) -> None:
        self.cursor.labels(stream=stream).set(cursor_ts)
        self.cursor_lag.labels(stream=stream).set(max(0.0, now - cursor_ts))

    def clock_stepped(self, seconds: float) -> None:
        """Re-express the times health is judged by in the host clock's new frame (see daemon.clock_stepped)."""
        self.start += seconds
        self._last_ok = {stream: at + seconds for stream, at in self._last_ok.items()}

    def last_success_at(self, stream: str) -> float | None:
        return self._last_ok.get(stream)

    def health(self, now: float, intervals: Mapping[str, float]) -> tuple[bool, str]:
        """Healthy while every stream succeeded within three of its intervals (or since start)."""
        problems = []
        for stream, interval in sorted(intervals.items()):
            limit = HEALTH_INTERVALS * interval
            last = self._last_ok.get(stream)
            if last is None:
                if now - self.start > limit:
                    problems.append(f"{stream}: no successful poll in {now - self.start:.0f}s since start")
            elif now - last > limit:
                problems.append(f"{stream}: last successful poll {now - last:.0f}s ago (limit {limit:.0f}s)")
        if problems:
            return False, "; ".join(problems)
        return True, "ok"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


HealthFn = Callable[[], tuple[bool, str]]


class Exposes(Protocol):
    """What /metrics serves: a daemon's Metrics, or on PostgreSQL the endpoint that shows the
    standby's or the leading term's (watcher.endpoint)."""

    def exposition(self) -> bytes: ...


def _response(status: str, body: bytes, content_type: str, head: bool) -> bytes:
    headers = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return headers.encode("ascii") + (b"" if head else body)


def route(method: str, target: str, metrics: Exposes, health_fn: HealthFn) -> bytes:
    """The full HTTP response for one request line."""
    text = "text/plain; charset=utf-8"
    path = target.split("?", 1)[0]
    if path not in ("/metrics", "/healthz"):
        return _response("404 Not Found", b"not found\n", text, False)
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"method not allowed\n", text, False)
    head = method == "HEAD"
    if path == "/metrics":
        return _response("200 OK", metrics.exposition(), CONTENT_TYPE_LATEST, head)
    ok, reason = health_fn()
    if ok:
        return _response("200 OK", b"ok\n", text, head)
    return _response("503 Service Unavailable", reason.encode() + b"\n", text, head)


def _handler(
    metrics: Exposes, health_fn: HealthFn, max_connections: int = MAX_CONNECTIONS
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    active = 0
    # Connections still sending their headers, oldest first: when the cap is reached the oldest of
    # them makes room, so clients that hold connections open cannot shut scrapes and health out.
    waiting: dict[asyncio.StreamWriter, None] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        if active >= max_connections:
            if not waiting:
                writer.transport.abort()
                return
            oldest = next(iter(waiting))
            del waiting[oldest]
            oldest.transport.abort()
        active += 1
        waiting[writer] = None
        try:
            # A bounded wait and size: a stuck or hostile client cannot pin a connection.
            async with asyncio.timeout(HEADER_DEADLINE):
                head = await reader.readuntil(b"\r\n\r\n")
            waiting.pop(writer, None)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                response = _response("400 Bad Request", b"bad request\n", "text/plain", False)
            else:
                try:
                    response = route(parts[0], parts[1], metrics, health_fn)
                except Exception:
                    # A failing health check must answer (as unhealthy), not drop the connection.
                    log.exception("metrics endpoint failed")
                    response = _response("500 Internal Server Error", b"error\n", "text/plain", False)
            writer.write(response)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            waiting.pop(writer, None)
            active -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return handle


async def serve(
    metrics: Exposes, host: str, port: int, health_fn: HealthFn, *, max_connections: int = MAX_CONNECTIONS
) -> asyncio.Server:
    """Listen on host:port (port 0 picks one) for GET /metrics and GET /healthz; close() to stop."""
    handler = _handler(metrics, health_fn, max_connections)
    return await asyncio.start_server(handler, host, port, limit=MAX_REQUEST_BYTES)
