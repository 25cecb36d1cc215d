"""The daemon's runtime: everything one configuration runs on, built and torn down together.

`runtime` opens the state file, builds the API client, the sinks, the dispatcher and the poller
around it, and closes them in the right order. Both `once` and the long-running `Daemon` run on it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import httpx
import structlog

from watcher import __version__
from watcher.clock import Clock
from watcher.config import Config, SinkConfig
from watcher.convertr import ConvertrClient
from watcher.delivery.dispatcher import Dispatcher
from watcher.errors import StateError
from watcher.liveness import DISPATCH_STALL, JOB, Liveness, poll_jobs, stall_limit
from watcher.metrics import Metrics
from watcher.poller import CAMPAIGNS, CREATED, UPDATED, Poller
from watcher.sinks import build_sink
from watcher.sinks.base import Sink
from watcher.state.records import SinkState
from watcher.state.store import Store, open_store

# The name its lines have always carried: an operator's log filter keeps matching them.
log = structlog.get_logger("watcher.daemon")


def fingerprint(sink: SinkConfig) -> str:
    """Changes with any key of the sink's configuration: a disabled sink then gets another chance.

    Every key counts (not only the URL): an operator who edits a refused sink expects the edit to
    be tried, and the README promises exactly that.
    """
    parts = (
        sink.type,
        sink.url,
        *sink.secrets,
        ",".join(sorted(sink.events)),
        ",".join(map(str, sink.campaign_ids)),
        repr(sink.timeout),
        ",".join(map(repr, sink.retry_schedule)),
        repr(sink.max_age),
        str(sink.include_pii),
        str(sink.concurrency),
        str(sink.enabled),
    )
    if sink.broker:  # only for them, so an upgrade leaves every other sink's fingerprint as it was
        parts += (sink.subject, sink.exchange, sink.routing_key, sink.stream, str(sink.maxlen))
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


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
    liveness: Liveness
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Builds an API client like the first one (same transport and hooks), for a reload that changes [convertr].
    make_client: Callable[[Config], ConvertrClient] | None = None
    history_marked: bool = False  # the lineage marker is known to be written
    history_unwritten: bool = False  # writing it failed once (said in the log)


@asynccontextmanager
async def runtime(
    config: Config,
    clock: Clock,
    *,
    api_transport: httpx.AsyncBaseTransport | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    stall: float | None = None,
    fence_epoch: Callable[[], int | None] | None = None,
    member: str | None = None,
) -> AsyncIterator[Runtime]:
    # fence_epoch: on PostgreSQL, the epoch this daemon leads under (watcher.leading); every write
    # transaction of the store checks it. member: its Leadership.member, in the sessions' names, so
    # a standby taking over can end the sessions this daemon left busy when cut off.
    store = open_store(config.state, fence_epoch=fence_epoch, member=member)
    try:
        # Pages only, no index-to-table matching (about 0.2 s per 100 MB): a damaged file is
        # refused here in one line rather than failing poll after poll.
        store.verify(quick=True)
    except StateError:
        store.close()
        raise
    streams = [
        s
        for s, on in (
            (CREATED, config.leads.enabled),
            (UPDATED, config.leads.enabled and config.leads.updates),
            (CAMPAIGNS, config.campaigns.enabled),
        )
        if on
    ]
    schema = config.state.postgres.schema if config.state.postgres is not None else "sqlite"
    metrics = Metrics(clock.now(), streams=streams, sinks=[s.name for s in config.sinks], state=schema)
    if fence_epoch is not None:
        metrics.set_leader(True)  # a runtime on PostgreSQL is built for a term as leader (watcher.leading)
    metrics.set_request_budget(config.convertr.request_budget)
    live = Liveness(
        clock.monotonic(),
        poll_jobs(config),
        stall_limit(config) if stall is None else stall,
        dispatcher_limit=DISPATCH_STALL if config.sinks else None,
    )

    def on_response(endpoint: str, status: int | None, _seconds: float) -> None:
        metrics.api_response(endpoint, status)
        live.activity(JOB.get(), clock.monotonic())

    def make_client(cfg: Config) -> ConvertrClient:
        return ConvertrClient(
            cfg.convertr,
            clock=clock,
            transport=api_transport,
            on_response=on_response,
            on_budget_wait=metrics.budget_waited,
        )

    client = make_client(config)
    sinks = [build_sink(s, clock=clock, version=__version__, campaign_names=store.campaign_names) for s in config.sinks]
    stopping = asyncio.Event()
    dispatcher = Dispatcher(store, sinks, clock, metrics=metrics, on_progress=lambda: live.tick(clock.monotonic()))
    dispatcher.sync_sinks({s.name: fingerprint(s) for s in config.sinks})
    warn_stranded(store.sink_states([s.name for s in config.sinks]), config, metrics)
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
    rt = Runtime(config, clock, store, client, sinks, dispatcher, poller, metrics, live, stopping, make_client)
    try:
        yield rt
    finally:
        # The dispatcher's list, not the first one: a reload may have replaced sinks and client.
        for sink in rt.dispatcher.sinks:
            with suppress(Exception):
                await sink.aclose()
        await rt.client.aclose()
        store.close()


def stranded(states: list[SinkState], config: Config) -> dict[str, int]:
    """Pending and dead deliveries of each sink the configuration no longer names."""
    names = [s.name for s in config.sinks]
    return {s.name: s.pending + s.dead for s in states if s.stranded(names)}


def warn_stranded(states: list[SinkState], config: Config, metrics: Metrics) -> None:
    """Say loudly that a renamed or removed sink left events behind, and how to move them."""
    counts = stranded(states, config)
    metrics.set_stranded(counts)
    for name, n in sorted(counts.items()):
        log.error(
            "sink is no longer configured but holds undelivered events: nothing sends them until "
            "`replay --sink NEW --from-sink OLD` moves them",
            sink=name,
            deliveries=n,
        )
