"""/metrics and /healthz of a daemon on a PostgreSQL state, for its whole life: standing by and leading.

On SQLite the daemon serves them from its runtime (`Daemon._serve_metrics`). On PostgreSQL a
runtime lasts one term as leader, and a standby has none; yet a standby must be observable
(`watcher_leader 0`, so a dashboard and the "no leader" alert tell a pair with a live standby from
a single daemon) and must answer the probes that keep it running: a Kubernetes liveness probe
that finds no port restarts the pod, and systemd's watchdog aborts a unit that stops pinging,
while the standby is doing exactly what it should. So `run_leading` listens once, before it first
stands by; each term shows its own metrics and health on that one port, and between terms the
standby's are shown again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import structlog

from watcher.clock import Clock
from watcher.config import Config
from watcher.errors import ConfigError
from watcher.metrics import HealthFn, Metrics, serve
from watcher.notify import Notifier

log = structlog.get_logger("watcher.daemon")


def _standing_by() -> tuple[bool, str]:
    # Answering at all proves the event loop turns, which is all a standby does besides the election;
    # a standby that cannot reach the database is no better after a restart (the log says why).
    return True, "standing by"


class Endpoint:
    """What the one listening port shows: the standby's metrics, or the leading term's (`show`)."""

    def __init__(self, standby: Metrics) -> None:
        self.standby = standby
        self._metrics = standby
        self._health: HealthFn = _standing_by

    def show(self, metrics: Metrics, health: HealthFn) -> None:
        """A term began: its runtime's metrics (watcher_leader 1) and its health from now on."""
        self._metrics, self._health = metrics, health

    def stand_by(self) -> None:
        """The term ended: the standby's metrics (watcher_leader 0) again, healthy while standing by."""
        self._metrics, self._health = self.standby, _standing_by

    def exposition(self) -> bytes:
        return self._metrics.exposition()

    def health(self) -> tuple[bool, str]:
        return self._health()

    async def listen(self, listen: tuple[str, int] | None) -> asyncio.Server | None:
        """Start listening on `[metrics] listen` (None: not configured); ConfigError when the port is taken."""
        if listen is None:
            return None
        host, port = listen
        try:
            server = await serve(self, host, port, self.health)
        except OSError as exc:
            raise ConfigError("metrics.listen", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound = server.sockets[0].getsockname()
        log.info("metrics endpoint listening", host=bound[0], port=bound[1], paths=["/metrics", "/healthz"])
        return server


@asynccontextmanager
async def serving(config: Config, clock: Clock) -> AsyncIterator[Endpoint]:
    """The endpoint of a daemon on a PostgreSQL state, listening for the block (when configured).

    The standby's metrics name the state (the schema) and no stream or sink: a standby polls and
    delivers nothing, so it has no such figures to show, only `watcher_leader 0`."""
    schema = config.state.postgres.schema if config.state.postgres is not None else "sqlite"
    endpoint = Endpoint(Metrics(clock.now(), state=schema))
    server = await endpoint.listen(config.metrics.listen)
    try:
        yield endpoint
    finally:
        if server is not None:
            server.close()
            with suppress(Exception):
                await server.wait_closed()


async def ping_while_standing_by(notifier: Notifier) -> None:
    """Feed systemd's watchdog while standing by, until cancelled (a term's Daemon feeds it then).

    A standby's only work is the election, on this same event loop: a ping proves the loop turns.
    Without pings the unit's WatchdogSec= would abort a healthy standby every few minutes."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
