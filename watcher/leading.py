"""The daemon on a PostgreSQL state: it works only while it leads (watcher.leadership).

On SQLite the state file's lock (watcher.lock) makes one process the writer. On PostgreSQL the
lease does: `run` stands by (no Convertr request, no delivery, no work held) until it leads, then
runs the daemon on a store fenced by its epoch, and goes back to standing by when it stops leading
(deposed, or its lease at risk); `once` runs only when it can lead at once, and refuses like a
locked file otherwise. Every write of the term is fenced, so a deposed leader commits nothing
even before it has noticed.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import structlog

from watcher.clock import Clock
from watcher.config import Config, PostgresState
from watcher.errors import ConfigError, StateDamaged, StateError, StateLocked, StateLost, StateTooNew
from watcher.exitcodes import EXIT_OK
from watcher.leadership import Leadership
from watcher.lease import LeaseTimings
from watcher.logs import LOG_CAPTURE_ENV, configure_logging
from watcher.notify import Notifier

log = structlog.get_logger("watcher.leading")


def postgres_of(config: Config) -> PostgresState:
    pg = config.state.postgres
    if pg is None:
        raise ValueError("leadership needs a PostgreSQL state")
    return pg


def fence_of(leadership: Leadership) -> Callable[[], int | None]:
    """The epoch a write transaction fences on: this daemon's while it leads, None (refused) otherwise."""
    return lambda: leadership.epoch if leadership.leading() else None


@asynccontextmanager
async def taking_part(config: Config, timings: LeaseTimings | None = None) -> AsyncIterator[Leadership]:
    """This process in the election for the block; on the way out its lease is released (a standby
    takes over at its next look) and its member row removed. The lease is `[state] lease` unless
    `timings` says otherwise."""
    pg = postgres_of(config)
    leadership = Leadership(pg.url, pg.schema, timings or pg.timings)
    task = asyncio.create_task(leadership.run(), name="leadership")
    try:
        yield leadership
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def lead_now(leadership: Leadership, config: Config, clock: Clock) -> int:
    """The epoch, once this process leads; StateLocked when another daemon leads (`once`).

    A first look decides: no lease, or an expired one, is taken at once; a live one held by
    another daemon is a refusal, as the SQLite file's lock refuses. Unanswered within two
    leadership queries' time: a StateError the caller reports.
    """
    from watcher.errors import StateError

    pg = postgres_of(config)
    deadline = clock.monotonic() + 2 * leadership.timings.op_timeout + 1.0
    while clock.monotonic() < deadline:
        if leadership.leading() and leadership.epoch is not None:
            return leadership.epoch
        if leadership.leader is not None:
            held = leadership.leader
            raise StateLocked(
                f"the state in {pg.shown()} is led by another daemon (pid {held.pid} on {held.host}, "
                f"since {held.since:%Y-%m-%d %H:%M:%S %Z}); one process may poll and deliver at a time: "
                "stop that one or wait for it to finish"
            )
        await asyncio.sleep(0.02)
    raise StateError(
        f"cannot take the lead of the state in {pg.shown()}: "
        f"{leadership.last_error or 'the database did not answer in time'}"
    )


async def run_leading(config: Config, clock: Clock, notifier: Notifier) -> int:
    """`run` on PostgreSQL: stand by, lead, stand by again, until SIGTERM or SIGINT."""
    from watcher.daemon import reloadable, run_term
    from watcher.endpoint import ping_while_standing_by, serving

    pg = postgres_of(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # The metrics port is bound first and kept for the process's life: a standby is scraped and probed too.
    async with serving(config, clock) as endpoint, taking_part(config) as leadership:
        # Installed once for the process's life (a term's daemon replaces them while it runs and
        # leaves its own in place): never the default action, which would end the process uncleanly.
        def standing_by_signals() -> None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, reload_while_standing_by)

        def reload_while_standing_by() -> None:
            # Read now, not at the next term: an operator sends SIGHUP to every daemon of a pair after
            # editing the file, and a standby that ignored it took over on the old sinks, URLs and
            # secrets (events to an endpoint already removed). Invalid or state-changing: refused,
            # the configuration in force stays, as a leader's reload does.
            nonlocal config
            try:
                new = reloadable(config)
            except ConfigError as exc:
                log.error("SIGHUP while standing by: reload REFUSED; the previous configuration stays", error=str(exc))
                return
            configure_logging(
                new.log.level, new.log.format, secrets=new.secret_values(), capture=os.environ.get(LOG_CAPTURE_ENV)
            )
            config = new
            log.info("SIGHUP while standing by: configuration read again; the next term runs on it")

        try:
            while not stop.is_set():
                standing_by_signals()
                notifier.ready("standing by: another daemon leads, or none has yet")
                log.info("standing by until this daemon leads the state", state=pg.shown(), host=leadership.host)
                leading = asyncio.create_task(leadership.wait_leading())
                stopping = asyncio.create_task(stop.wait())
                pinging = asyncio.create_task(ping_while_standing_by(notifier))
                try:
                    await asyncio.wait({leading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    leading.cancel()
                    stopping.cancel()
                    pinging.cancel()
                if stop.is_set():
                    break
                try:
                    # The configuration a reload applied during the term carries into the next: starting
                    # again from the one read at start undid it (events went to a sink URL the operator
                    # had moved away from, signed with a secret already rotated).
                    code, deposed, config = await run_term(
                        config, clock, notifier, leadership, endpoint, on_stop=stop.set
                    )
                except (StateTooNew, StateDamaged, StateLost):
                    raise  # only the operator can help (exit 78), as on SQLite
                except StateError as exc:
                    # The term could not start (its store's connection timed out, a write at start-up was
                    # refused): `run` pauses and retries a StateError, it does not exit. Exiting here left
                    # no daemon working when the leader it had just replaced was dead. The lease goes
                    # back, and a lease passes before this daemon tries again, so a standby that can
                    # reach the database may lead meanwhile.
                    endpoint.stand_by()
                    log.error("this daemon leads but cannot start its term; standing by", error=str(exc))
                    await leadership.release()
                    with suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=leadership.timings.ttl)
                    continue
                endpoint.stand_by()
                if not deposed:
                    return code
            return EXIT_OK
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
