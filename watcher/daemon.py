"""Wiring: build the runtime from a config, then run it once (`once`) or until a signal (`run`).

`run` schedules the polls with APScheduler's AsyncIOScheduler (one instance of each job at a
time, missed runs coalesced) and runs the dispatcher beside them, woken whenever a poll commits
new outbox rows. On SIGTERM or SIGINT it tells systemd it is stopping, lets the walk in hand
finish its page (each page is one transaction that never awaits, so a cancellation cannot split
one), gives deliveries in flight a moment, and exits 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from watcher import __version__
from watcher.clock import Clock
from watcher.config import Config, SinkConfig
from watcher.convertr import ConvertrClient
from watcher.errors import AuthError, StateError, WatcherError
from watcher.metrics import Metrics, serve
from watcher.notify import Notifier
from watcher.outbox import Dispatcher
from watcher.poller import Poller
from watcher.sinks import Sink, build_sink
from watcher.store import Store

log = structlog.get_logger("watcher.daemon")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 78
HOUSEKEEPING_INTERVAL = 3600.0


def fingerprint(sink: SinkConfig) -> str:
    """Changes when an operator points a sink somewhere else: a disabled sink then gets another chance."""
    return hashlib.sha256(f"{sink.type}\x1f{sink.url}\x1f{sink.enabled}".encode()).hexdigest()[:16]


@dataclass
class Runtime:
    config: Config
    clock: Clock
    store: Store
    client: ConvertrClient
    sinks: list[Sink]
    dispatcher: Dispatcher
    poller: Poller
    metrics: Metrics
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    last_progress: float | None = None


@asynccontextmanager
async def runtime(
    config: Config,
    clock: Clock,
    *,
    api_transport: httpx.AsyncBaseTransport | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> AsyncIterator[Runtime]:
    store = Store.open(config.state.path)
    streams = [s for s, on in (("leads.created", config.leads.enabled), ("campaigns", config.campaigns.enabled)) if on]
    metrics = Metrics(clock.now(), streams=streams, sinks=[s.name for s in config.sinks])
    client = ConvertrClient(
        config.convertr,
        clock=clock,
        transport=api_transport,
        on_response=lambda endpoint, status, _seconds: metrics.api_response(endpoint, status),
    )
    sinks = [build_sink(s, clock=clock, version=__version__) for s in config.sinks]
    stopping = asyncio.Event()
    rt: Runtime
    dispatcher = Dispatcher(store, sinks, clock, metrics=metrics, on_progress=lambda: _progress(rt))
    dispatcher.sync_sinks({s.name: fingerprint(s) for s in config.sinks})
    poller = Poller(
        config,
        client,
        store,
        clock,
        on_events=dispatcher.wake,
        metrics=metrics,
        should_stop=stopping.is_set,
        progress=progress,
    )
    rt = Runtime(config, clock, store, client, sinks, dispatcher, poller, metrics, stopping)
    try:
        yield rt
    finally:
        for sink in sinks:
            with suppress(Exception):
                await sink.aclose()
        await client.aclose()
        store.close()


def _progress(rt: Runtime) -> None:
    rt.last_progress = rt.clock.monotonic()


# --- once -----------------------------------------------------------------------------------


async def run_once(config: Config, clock: Clock, **kwargs: Any) -> int:
    """One poll of every enabled stream and one delivery pass; 0 when all of it succeeded."""
    ok = True
    async with runtime(config, clock, **kwargs) as rt:
        jobs: list[Callable[[], Awaitable[object]]] = []
        if config.leads.enabled:
            jobs.append(rt.poller.poll_leads)
        if config.campaigns.enabled:
            jobs.append(rt.poller.poll_campaigns)
        for job in jobs:
            try:
                await job()
            except AuthError:
                raise
            except WatcherError as exc:
                log.error("poll failed", error=str(exc))
                ok = False
        passed = await rt.dispatcher.deliver_due_once()
        if passed.failed:
            ok = False
        log.info("delivery pass", attempted=passed.attempted, delivered=passed.delivered, failed=passed.failed)
        _housekeeping(rt)
    return EXIT_OK if ok else EXIT_FAILURE


def _housekeeping(rt: Runtime) -> None:
    cfg = rt.config
    pruned = rt.store.prune(
        rt.clock.now(),
        delivered_retention=cfg.state.delivered_retention,
        attempt_retention=cfg.state.attempt_log_retention,
        snapshot_retention=cfg.leads.snapshot_retention,
    )
    if any(pruned.values()):
        log.info("pruned", **pruned)


# --- run ------------------------------------------------------------------------------------


class Daemon:
    def __init__(self, rt: Runtime, notifier: Notifier) -> None:
        self.rt = rt
        self.notifier = notifier
        self.fatal: BaseException | None = None
        self.polls: set[asyncio.Task[Any]] = set()
        self.last_poll: dict[str, float] = {}

    async def _job(self, name: str, poll: Callable[[], Awaitable[object]]) -> None:
        if self.rt.stopping.is_set():
            return
        task = asyncio.current_task()
        if task is not None:
            self.polls.add(task)
        try:
            await poll()
            self.last_poll[name] = self.rt.clock.now()
            _progress(self.rt)
        except (AuthError, StateError) as exc:
            log.error("fatal", error=str(exc))
            self.fatal = exc
            self.rt.stopping.set()
        except WatcherError as exc:
            log.error("poll failed; the next one retries from the same cursor", job=name, error=str(exc))
        except Exception:
            log.exception("poll crashed; the next one retries from the same cursor", job=name)
        finally:
            if task is not None:
                self.polls.discard(task)
        self._status()

    def _status(self) -> None:
        states = self.rt.store.sink_states([s.name for s in self.rt.sinks])
        pending = sum(s.pending for s in states)
        last = max(self.last_poll.values()) if self.last_poll else None
        when = datetime.fromtimestamp(last, UTC).strftime("%H:%M:%S") if last else "never"
        self.notifier.status(f"last poll {when} UTC; {pending} deliveries pending")

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        sent_for: float | None = None
        while not self.rt.stopping.is_set():
            # Only proven progress keeps systemd from restarting us: a hung poll or a stalled
            # scheduler stops the pings even though this task would happily go on.
            progress = self.rt.last_progress
            if progress is not None and progress != sent_for:
                self.notifier.watchdog()
                sent_for = progress
            with suppress(TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), timeout=interval)

    def _housekeeping(self) -> None:
        try:
            _housekeeping(self.rt)
        except StateError as exc:
            log.error("housekeeping failed", error=str(exc))

    async def run(self) -> int:
        rt, cfg = self.rt, self.rt.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        scheduler = AsyncIOScheduler(
            timezone=UTC,
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
        )
        start = datetime.now(UTC)
        if cfg.leads.enabled:
            scheduler.add_job(
                self._job,
                IntervalTrigger(seconds=cfg.leads.interval),
                args=("leads", rt.poller.poll_leads),
                id="leads",
                next_run_time=start,
            )
        if cfg.campaigns.enabled:
            scheduler.add_job(
                self._job,
                IntervalTrigger(seconds=cfg.campaigns.interval),
                args=("campaigns", rt.poller.poll_campaigns),
                id="campaigns",
                next_run_time=start,
            )
        scheduler.add_job(self._housekeeping, IntervalTrigger(seconds=HOUSEKEEPING_INTERVAL), id="housekeeping")
        server = None
        if cfg.metrics.listen is not None:
            host, port = cfg.metrics.listen
            intervals = {}
            if cfg.leads.enabled:
                intervals["leads.created"] = cfg.leads.interval
            if cfg.campaigns.enabled:
                intervals["campaigns"] = cfg.campaigns.interval
            server = await serve(rt.metrics, host, port, lambda: rt.metrics.health(rt.clock.now(), intervals))
        scheduler.start()
        dispatcher = asyncio.create_task(rt.dispatcher.run(rt.stopping), name="dispatcher")
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        self.notifier.ready()
        self._status()
        log.info("started", version=__version__, sinks=[s.name for s in rt.sinks])
        await rt.stopping.wait()
        self.notifier.stopping()
        log.info("stopping")
        scheduler.shutdown(wait=False)
        if self.polls:
            # Each walk checks `stopping` after committing a page; give it time to get there.
            _done, late = await asyncio.wait(set(self.polls), timeout=10.0)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=2.0)
        await dispatcher
        watchdog.cancel()
        if server is not None:
            server.close()
            with suppress(Exception):
                await server.wait_closed()
        log.info("stopped")
        if isinstance(self.fatal, AuthError):
            raise self.fatal
        return EXIT_FAILURE if self.fatal is not None else EXIT_OK

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signal received", signal=sig.name)
        self.rt.stopping.set()


async def run_daemon(config: Config, clock: Clock, notifier: Notifier) -> int:
    async with runtime(config, clock) as rt:
        return await Daemon(rt, notifier).run()
