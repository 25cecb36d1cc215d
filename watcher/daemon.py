"""Wiring: build the runtime from a config, then run it once (`once`) or until a signal (`run`).

`run` schedules the polls on the monotonic clock (`watcher.cadence`: one run of each job at a
time, missed runs coalesced; a step of the wall clock moves nothing) and runs the dispatcher
beside them, woken whenever a poll commits new outbox rows. On SIGTERM or SIGINT it tells
systemd it is stopping, lets the walk in hand finish its page (each page is one transaction that
never awaits, so a cancellation cannot split one), gives deliveries in flight a moment, and
exits 0.

On SIGHUP it reads the configuration file again and applies it between polls (see
`Daemon._reload`): sinks, filters, intervals, secrets and the log level. A file that does not
load is refused with one error line, and the configuration already running carries on.

The systemd watchdog is fed only while the daemon proves it is moving (`watcher.liveness`). What
it runs on (store, client, sinks, dispatcher, poller) is built by `watcher.runtime`.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watcher import __version__
from watcher.cadence import Cadence
from watcher.clock import Clock, SteppedClock, SystemClock, boot_seconds
from watcher.clockframe import boot_id, step_while_stopped
from watcher.clockframe import keep as keep_clock_frame
from watcher.config import Config, load_config
from watcher.errors import AuthError, ConfigError, StateDamaged, StateError, StateTooNew, WatcherError
from watcher.exitcodes import EXIT_FAILURE, EXIT_OK
from watcher.lineage import lost_history, mark, refuse_lost_history
from watcher.liveness import DISPATCH_STALL, JOB, health_intervals, liveness_problem, poll_jobs, stall_limit
from watcher.logs import LOG_CAPTURE_ENV, configure_logging
from watcher.metrics import serve
from watcher.notify import Notifier
from watcher.runinfo import config_fingerprint, write_info
from watcher.runtime import Runtime, fingerprint, runtime, stranded, warn_stranded
from watcher.sinks import build_sink
from watcher.sinks.broker import probe_at_start
from watcher.state.store import open_store

if TYPE_CHECKING:
    from watcher.endpoint import Endpoint
    from watcher.leadership import Leadership

log = structlog.get_logger("watcher.daemon")

HOUSEKEEPING_INTERVAL = 3600.0
HOUSEKEEPING, TICK = "housekeeping", "tick"  # the cadence's jobs besides the polls
# After the state file refused a page (disk full, read-only directory): polls pause this long, then
# try again. Each try re-reads one page from the API, so the pause keeps an outage cheap.
STORAGE_RETRY = 10.0
STOP_GRACE = 5.0  # for a walk to finish its page; TimeoutStopSec= leaves plenty more


# --- once -----------------------------------------------------------------------------------


async def run_once(config: Config, clock: Clock, *, start_over: str | None = None, **kwargs: Any) -> int:
    """One poll of every enabled stream and one delivery pass; 0 when all of it succeeded.

    The pass runs beside the polls: a backfill's first pages are being delivered while its last
    ones are read. It ends once the polls have and nothing due is left untried. `start_over`: see
    `history_kept`.
    """
    if config.state.postgres is not None:
        return await _once_leading(config, clock, **kwargs)
    history_kept(config, start_over)
    async with runtime(config, clock, **kwargs) as rt:
        return await _once(rt)


async def _once_leading(config: Config, clock: Clock, **kwargs: Any) -> int:
    """`once` on PostgreSQL: only while it leads (StateLocked when another daemon does), every write fenced."""
    from watcher.leading import fence_of, lead_now, taking_part

    async with taking_part(config) as leadership:
        await lead_now(leadership, config, clock)
        async with runtime(config, clock, fence_epoch=fence_of(leadership), member=leadership.member, **kwargs) as rt:
            return await _once(rt)


async def _once(rt: Runtime) -> int:
    """One poll of every enabled stream and one delivery pass on `rt`."""
    polls = asyncio.create_task(_poll_all(rt))
    polls.add_done_callback(lambda _: rt.dispatcher.wake())
    passing = asyncio.create_task(rt.dispatcher.deliver_due_once(producing=lambda: not polls.done()))
    try:
        ok = await polls
    except asyncio.CancelledError:
        passing.cancel()  # interrupted: what is not sent now goes at the next run
        raise
    except Exception:
        # A poll that failed for good still lets what it committed go out.
        await passing
        raise
    passed = await passing
    if rt.store.cursors():
        mark_history(rt)
    log.info(
        "delivery pass",
        attempted=passed.attempted,
        delivered=passed.delivered,
        failed=passed.failed,
        broken=passed.broken,
    )
    _housekeeping(rt)
    return EXIT_OK if ok and not passed.failed and not passed.broken else EXIT_FAILURE


async def _poll_all(rt: Runtime) -> bool:
    """Poll each enabled stream once; False when one failed (the next is polled anyway)."""
    jobs: list[Callable[[], Awaitable[object]]] = []
    if rt.config.leads.enabled:
        jobs.append(rt.poller.poll_leads)
    if rt.config.campaigns.enabled:
        jobs.append(rt.poller.poll_campaigns)
    ok = True
    for job in jobs:
        try:
            await job()
        except (AuthError, StateError):
            raise  # nothing the next stream could do better: the CLI says it in one line
        except WatcherError as exc:
            log.error("poll failed", error=str(exc))
            ok = False
    return ok


def mark_history(rt: Runtime) -> None:
    """Write the lineage marker once the state has a cursor (see watcher.lineage; SQLite's file alone)."""
    if rt.history_marked or rt.config.state.postgres is not None:
        return
    try:
        mark(rt.config.state.path, rt.clock.now())
    except OSError as exc:
        # Not fatal (without it a lost -wal goes unnoticed until it is written): tried again after
        # the next poll, said once.
        if not rt.history_unwritten:
            rt.history_unwritten = True
            log.warning("cannot write the history marker beside the state file", error=exc.strerror or str(exc))
        return
    rt.history_marked = True


def _housekeeping(rt: Runtime) -> None:
    cfg = rt.config
    stopped = [s.name for s in cfg.sinks if not s.enabled or rt.store.sink_disabled(s.name)]
    aged = rt.store.age_out(
        rt.clock.now(),
        dead_retention=cfg.state.dead_retention,
        configured={s.name: s.max_age for s in cfg.sinks},
        stopped=stopped,
    )
    if any(aged.values()):
        # Counts only: the rows held personal data, the log line must not. A stranded queue going
        # is an operator's loss to hear about, not routine housekeeping.
        level = log.warning if aged.get("removed_sinks") else log.info
        level("personal data aged out", **aged)
    pruned = rt.store.prune(
        rt.clock.now(),
        delivered_retention=cfg.state.delivered_retention,
        attempt_retention=cfg.state.attempt_log_retention,
        snapshot_retention=cfg.leads.snapshot_retention,
    )
    if any(pruned.values()):
        log.info("pruned", **pruned)


# --- run ------------------------------------------------------------------------------------


def reloadable(old: Config) -> Config:
    """The configuration file read again, for a reload: ConfigError when invalid or when it changes the state."""
    new = load_config(old.path)
    if new.state.path != old.state.path:
        raise ConfigError("state.path", "cannot change on reload (the lock is on the old file): restart")
    old_pg, new_pg = old.state.postgres, new.state.postgres
    if old_pg is not None and new_pg is not None and replace(new_pg, lease=old_pg.lease) == old_pg:
        if new_pg.lease != old_pg.lease:
            # The running election holds its timings; every daemon on the state restarts with the new one.
            raise ConfigError("state.lease", "cannot change on reload (the daemon leads by it): restart")
    elif new_pg != old_pg:
        raise ConfigError("state.url", "cannot change on reload (the daemon leads that state): restart")
    return new


class Daemon:
    def __init__(
        self,
        rt: Runtime,
        notifier: Notifier,
        *,
        housekeeping_interval: float = HOUSEKEEPING_INTERVAL,
        endpoint: Endpoint | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.rt = rt
        # A process that outlives this daemon (a term on PostgreSQL) hears of stop signals too, and
        # keeps the handlers in place afterwards: removing one restores the default action, and a
        # SIGTERM or SIGHUP between two terms would kill the process without a clean stop.
        self.on_stop = on_stop
        # On PostgreSQL the port outlives the term (watcher.endpoint): the term shows its metrics there.
        self.endpoint = endpoint
        self.notifier = notifier
        self.housekeeping_interval = housekeeping_interval
        self.fatal: BaseException | None = None
        self.polls: set[asyncio.Task[Any]] = set()
        self.last_poll: dict[str, float] = {}
        self.storage_error: str | None = None  # why the last page commit failed, until one succeeds
        self.damaged: str | None = None  # SQLite found the state file corrupt: no more walks
        self.storage_retry_at = float("-inf")  # monotonic: polls are skipped until then
        self.scheduler: Cadence | None = None
        self.reloads = 0
        self.loaded_at = rt.clock.now()
        self._reload_lock = asyncio.Lock()
        self._reload_tasks: set[asyncio.Task[None]] = set()
        self._refused: tuple[str, float] | None = None

    async def _job(self, name: str, poll: Callable[[], Awaitable[object]]) -> None:
        if self.rt.stopping.is_set():
            return
        if self.damaged is None and self.rt.dispatcher.damaged is not None:
            # The delivery side found the damage first (and said so): no walk adds to that file either.
            self.damaged = self.rt.dispatcher.damaged
            self.notifier.status(f"stopped polling: {self.damaged}")
        if self.damaged is not None or self.rt.clock.monotonic() < self.storage_retry_at:
            # Paused, not stuck: the watchdog must keep seeing progress, or systemd restarts us in a
            # loop until StartLimitBurst leaves the unit failed while the disk is still full.
            self.rt.liveness.end(name, self.rt.clock.monotonic())
            return
        task = asyncio.current_task()
        if task is not None:
            self.polls.add(task)
        token = JOB.set(name)
        self.rt.liveness.begin(name, self.rt.clock.monotonic())
        try:
            await poll()
            self.last_poll[name] = self.rt.clock.now()
            mark_history(self.rt)
            if self.storage_error is not None:
                self.storage_error = None
                log.warning("state file writable again; polls resume", job=name)
        except AuthError as exc:
            # Every poll under way meets the same refused login; the stop is said once.
            if self.fatal is None:
                log.error("fatal", error=str(exc))
                self.fatal = exc
            self.rt.stopping.set()
        except StateDamaged as exc:
            # Walking on would write new pages into a file SQLite no longer trusts, and fail again every
            # interval. Deliveries carry on with what the outbox holds; the operator's guide takes over.
            self.damaged = str(exc)
            log.error(
                "state file is damaged: polling stops until the daemon is restarted on a sound file",
                job=name,
                error=str(exc),
            )
            self.notifier.status(f"stopped polling: {exc}")
        except StateError as exc:
            # A full disk or a read-only directory passes when space returns; exiting would not
            # bring it back. The page rolled back, so the next try starts from the same cursor.
            self.storage_error = str(exc)
            self.storage_retry_at = self.rt.clock.monotonic() + STORAGE_RETRY
            log.error(
                "state file cannot be written; polls pause and retry", job=name, retry_in=STORAGE_RETRY, error=str(exc)
            )
            self.notifier.status(f"paused: {exc}")
        except WatcherError as exc:
            log.error("poll failed; the next one retries from the same cursor", job=name, error=str(exc))
        except Exception:
            log.exception("poll crashed; the next one retries from the same cursor", job=name)
        except asyncio.CancelledError:
            if not self.rt.stopping.is_set():
                raise
            # Cancelled by the stop: an expected end, not a failure for the scheduler to log.
            log.info("poll interrupted by the stop; the next start resumes from the same cursor", job=name)
        finally:
            # A failed poll is progress too: the loop turned, and restarting cannot bring the API back.
            self.rt.liveness.end(name, self.rt.clock.monotonic())
            JOB.reset(token)
            if task is not None:
                self.polls.discard(task)
        self._status()

    def _status(self) -> None:
        now = self.rt.clock.now()
        states = self.rt.store.sink_states([s.name for s in self.rt.sinks])
        for s in states:
            age = now - s.oldest_pending_at if s.oldest_pending_at else 0.0
            self.rt.metrics.set_outbox(s.name, s.pending, age)
            self.rt.metrics.set_dead(s.name, s.dead)
            self.rt.metrics.set_sink_disabled(s.name, s.disabled_at is not None)
        self.rt.metrics.set_stranded(stranded(states, self.rt.config))
        pending = sum(s.pending for s in states)
        last = max(self.last_poll.values()) if self.last_poll else None
        when = datetime.fromtimestamp(last, UTC).strftime("%H:%M:%S") if last else "never"
        self.notifier.status(f"last poll {when} UTC; {pending} deliveries pending")

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        withheld = False
        while not self.rt.stopping.is_set():
            live = self.rt.liveness
            problem = liveness_problem(live, self.rt.clock.monotonic())
            if problem is None:
                self.notifier.watchdog()
                if withheld:
                    withheld = False
                    log.warning("watchdog pings resumed")
            elif live.progressed and not withheld:
                withheld = True
                log.error("watchdog pings withheld; systemd will restart the daemon", reason=problem)
                self.notifier.status(f"stalled: {problem}")
            with suppress(TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), timeout=interval)

    async def _housekeeping(self) -> None:
        # On the event loop, between page commits: never on a worker thread, where it would open a
        # transaction on the loop's connection under a page commit.
        try:
            _housekeeping(self.rt)
        except StateError as exc:
            log.error("housekeeping failed", error=str(exc))

    def _health(self) -> tuple[bool, str]:
        rt = self.rt
        damaged = self.damaged or rt.dispatcher.damaged
        if damaged:
            return False, f"state file is damaged (polls stopped): {damaged}"
        broken = self.storage_error or rt.dispatcher.write_error
        if broken:
            return False, f"state file cannot be written (polls paused, outcomes kept in memory): {broken}"
        return rt.metrics.health(rt.clock.now(), health_intervals(rt.config, rt.poller.updates_filter))

    async def _serve_metrics(self) -> asyncio.Server | None:
        if self.endpoint is not None:
            self.endpoint.show(self.rt.metrics, self._health)
            return None
        if self.rt.config.metrics.listen is None:
            return None
        host, port = self.rt.config.metrics.listen
        try:
            server = await serve(self.rt.metrics, host, port, self._health)
        except OSError as exc:
            # Another process holds the port (or the address is not local): the config must change.
            raise ConfigError("metrics.listen", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound = server.sockets[0].getsockname()
        log.info("metrics endpoint listening", host=bound[0], port=bound[1], paths=["/metrics", "/healthz"])
        return server

    def _schedule(self) -> Cadence:
        scheduler = Cadence(self.rt.clock)
        self._poll_jobs(scheduler, {})
        scheduler.add(HOUSEKEEPING, self.housekeeping_interval, self._housekeeping, at_once=False)
        # The clock step and the state file's identity, checked every second.
        scheduler.add(TICK, 1.0, self._tick)
        return scheduler

    def _poll_jobs(self, scheduler: Cadence, before: Mapping[str, float]) -> None:
        """Make the poll jobs match the configuration: new ones run at once, changed intervals restart."""
        rt = self.rt
        # Looked up at each run, so a reload's new poller attributes are what the next run uses.
        polls = {"leads": lambda: rt.poller.poll_leads(), "campaigns": lambda: rt.poller.poll_campaigns()}
        wanted = poll_jobs(rt.config)
        for name in set(before) - set(wanted):
            scheduler.remove(name)
        for name, interval in wanted.items():
            if name not in before:
                scheduler.add(name, interval, partial(self._job, name, polls[name]))
            elif before[name] != interval:
                scheduler.reschedule(name, interval)

    async def _tick(self) -> None:
        self.rt.clock.now()  # reading the wall clock is what notices a step (see SteppedClock)
        if self.fatal is None and self.rt.store.replaced():
            # A restore (or a clean-up) under the running daemon: its writes would go on into the
            # file that was there, and be gone at the next start. Stopping closes that file cleanly
            # (its -wal is folded into it and removed), so the restart opens the new one alone.
            self.fatal = StateError(f"state file {self.rt.store.path} was replaced or removed while the daemon ran")
            log.error(
                "the state file was replaced or removed under the running daemon; stopping so that the next "
                "start opens the file now there (stop the daemon before restoring a backup)",
                path=str(self.rt.store.path),
            )
            self.rt.stopping.set()

    # --- reload -------------------------------------------------------------------------------

    def _on_hup(self) -> None:
        # One reload at a time; HUPs arriving while one waits its turn fold into that one.
        if len(self._reload_tasks) > 1:
            return
        task = asyncio.create_task(self._reload(), name="reload")
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def _reload(self) -> None:
        async with self._reload_lock:
            if self.rt.stopping.is_set():
                return
            self.notifier.reloading("reloading the configuration")
            log.info("SIGHUP: reloading the configuration", path=str(self.rt.config.path))
            try:
                new = reloadable(self.rt.config)
            except ConfigError as exc:
                self._refuse(str(exc))
            else:
                try:
                    await self._apply(new)
                except WatcherError as exc:
                    self._refuse(str(exc))
            self.notifier.ready(self._status_line())

    def _refuse(self, reason: str) -> None:
        now = self.rt.clock.now()
        self._refused = (reason, now)
        self.rt.metrics.config_applied(now, ok=False)
        log.error("reload REFUSED: the new configuration is invalid; the previous one keeps running", error=reason)
        self._write_info()

    async def _apply(self, new: Config) -> None:
        """Swap in `new` between polls: no walk is under way while routes, client or intervals change."""
        rt, old = self.rt, self.rt.config
        scheduler = self.scheduler
        if scheduler is not None:
            scheduler.pause()
        try:
            if self.polls:
                log.info("reload waits for the polls under way to finish", polls=len(self.polls))
                await asyncio.wait(set(self.polls))
            configure_logging(
                new.log.level, new.log.format, secrets=new.secret_values(), capture=os.environ.get(LOG_CAPTURE_ENV)
            )
            if new.convertr != old.convertr and rt.make_client is not None:
                retired, rt.client = rt.client, rt.make_client(new)
                await retired.aclose()
                rt.metrics.set_request_budget(new.convertr.request_budget)
            rt.poller.reconfigure(new, rt.client)
            for sink in new.sinks:
                if sink.name not in {s.name for s in old.sinks}:
                    rt.metrics.add_sink(sink.name)
            rt.sinks = await rt.dispatcher.reconfigure(
                new.sinks,
                lambda c: build_sink(c, clock=rt.clock, version=__version__, campaign_names=rt.store.campaign_names),
            )
            rt.dispatcher.sync_sinks({s.name: fingerprint(s) for s in new.sinks})
            rt.config = new
            rt.liveness.intervals = poll_jobs(new)
            if rt.liveness.stall_limit == stall_limit(old):  # not a limit a test fixed
                rt.liveness.stall_limit = stall_limit(new)
            rt.liveness.dispatcher_limit = DISPATCH_STALL if new.sinks else None
            if scheduler is not None:
                self._poll_jobs(scheduler, poll_jobs(old))
            if new.metrics.listen != old.metrics.listen:
                log.warning("metrics.listen changes take effect at the next restart")
        finally:
            if scheduler is not None:
                scheduler.resume()
        self.reloads += 1
        self.loaded_at = rt.clock.now()
        self._refused = None
        rt.metrics.config_applied(self.loaded_at, ok=True)
        warn_stranded(rt.store.sink_states([s.name for s in new.sinks]), new, rt.metrics)
        self._write_info()
        log.info(
            "configuration reloaded",
            config_fingerprint=config_fingerprint(new),
            sinks=[s.name for s in new.sinks],
            log_level=new.log.level,
        )
        rt.dispatcher.wake()

    def _status_line(self) -> str:
        return f"config loaded {datetime.fromtimestamp(self.loaded_at, UTC):%H:%M:%S} UTC ({self.reloads} reloads)"

    def _write_info(self) -> None:
        cfg = self.rt.config
        info = {
            "pid": os.getpid(),
            "config_path": str(cfg.path),
            "loaded_at": self.loaded_at,
            "fingerprint": config_fingerprint(cfg),
            "config_digest": cfg.source_digest,
            "reloads": self.reloads,
            "reload_refused": self._refused[0] if self._refused else None,
            "reload_refused_at": self._refused[1] if self._refused else None,
        }
        if cfg.state.postgres is not None:
            return  # no file to write beside: the leadership tables say who runs (`status`)
        try:
            write_info(cfg.state.path, info)
        except OSError as exc:
            log.warning("cannot write the daemon info file beside the state file", error=exc.strerror or str(exc))

    async def run(self) -> int:
        rt = self.rt
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        server = await self._serve_metrics()
        scheduler = self.scheduler = self._schedule()
        dispatcher = asyncio.create_task(rt.dispatcher.run(rt.stopping), name="dispatcher")
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        probing = asyncio.create_task(probe_at_start(rt.sinks), name="probe")
        self.rt.metrics.config_applied(self.loaded_at, ok=True)
        self._write_info()
        self.notifier.ready()
        self._status()
        log.info(
            "started",
            version=__version__,
            sinks=[s.name for s in rt.sinks],
            config_fingerprint=config_fingerprint(rt.config),
        )
        await rt.stopping.wait()
        self.notifier.stopping("stopping: finishing the work in hand")
        log.info("stopping")
        # No new runs; the scheduler's shutdown would cancel the runs in hand at once, so it waits.
        scheduler.pause()
        if self.polls:
            # Each walk checks `stopping` after committing a page; give it time to get there. A
            # cancellation is safe too (a page's transaction never awaits), it only wastes a page.
            _done, late = await asyncio.wait(set(self.polls), timeout=STOP_GRACE)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=2.0)
        for task in list(self._reload_tasks):
            task.cancel()
        await scheduler.aclose()
        await dispatcher
        watchdog.cancel()
        probing.cancel()
        if server is not None:
            server.close()
            with suppress(Exception):
                await server.wait_closed()
        if self.on_stop is None:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        if isinstance(self.fatal, AuthError):
            raise self.fatal
        return EXIT_FAILURE if self.fatal is not None else EXIT_OK

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signal received", signal=sig.name)
        self.rt.stopping.set()
        if self.on_stop is not None:
            self.on_stop()


def history_kept(config: Config, start_over: str | None) -> None:
    """StateLost when the state file lost its history (watcher.lineage). `start_over` is the command
    that would start over, for the refusal to name; None means `--start-over` was given."""
    if start_over is not None:
        refuse_lost_history(config.state.path, start_over)
    elif lost_history(config.state.path, "") is not None:
        log.warning(
            "--start-over: the state file has no history; taking a fresh baseline "
            "(changes made since its history was lost are not announced)",
            path=str(config.state.path),
        )


async def run_daemon(config: Config, clock: Clock, notifier: Notifier, *, start_over: str | None = None) -> int:
    # Until the loop's handler is in place (start-up can take a while), a HUP must not end the
    # process as its default action would: `systemctl reload` during start-up is ignored instead.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not await _wait_for_storage(config, clock, notifier):
        return EXIT_OK  # stopped while waiting
    if config.state.postgres is not None:
        from watcher.leading import run_leading

        return await run_leading(config, clock, notifier)
    history_kept(config, start_over)
    stepped = SteppedClock(clock, boot_seconds if isinstance(clock, SystemClock) else None)
    async with runtime(config, stepped) as rt:
        boot = boot_id() if isinstance(clock, SystemClock) else None
        missed = step_while_stopped(config.state.path, boot, stepped.offset)

        def stepped_now(seconds: float) -> None:
            clock_stepped(rt, seconds)
            _keep_frame(config.state.path, boot, stepped.offset)

        stepped.on_step = stepped_now
        if missed:
            log.warning("the host clock stepped while the daemon was stopped", seconds=round(missed, 3))
            clock_stepped(rt, missed)
        _keep_frame(config.state.path, boot, stepped.offset)
        return await Daemon(rt, notifier).run()


async def run_term(
    config: Config,
    clock: Clock,
    notifier: Notifier,
    leadership: Leadership,
    endpoint: Endpoint | None = None,
    on_stop: Callable[[], None] | None = None,
) -> tuple[int, bool, Config]:
    """One term as the leader of a PostgreSQL state: the daemon runs on a store fenced by the epoch,
    until a stop signal or the end of the term. Returns the exit status, whether the term ended
    because this daemon no longer leads (then it stands by again), and the configuration in force at
    its end: a SIGHUP during the term may have replaced `config`, and the next term runs on that one.

    A clock step is noticed and applied while leading, as on SQLite; one made while this host did
    not lead is applied at the start of the term when this boot's daemon was the last to lead
    (watcher.state.pgframe: the frame is kept in the state).
    """
    from watcher.leading import fence_of
    from watcher.state import pgframe
    from watcher.state.postgres import PostgresConnection

    stepped = SteppedClock(clock, boot_seconds if isinstance(clock, SystemClock) else None)
    async with runtime(config, stepped, fence_epoch=fence_of(leadership), member=leadership.member) as rt:
        store = rt.store
        assert isinstance(store, PostgresConnection)  # a term is led on a PostgreSQL state only
        boot = boot_id() if isinstance(clock, SystemClock) else None

        def keep_frame() -> None:
            try:
                pgframe.keep(store, boot, stepped.offset, stepped.now())
            except StateError as exc:
                # Only a step made before the next term goes unnoticed then; nothing done now depends on it.
                log.warning("cannot keep the clock frame in the state", error=str(exc))

        def stepped_now(seconds: float) -> None:
            clock_stepped(rt, seconds)
            keep_frame()

        stepped.on_step = stepped_now
        try:
            missed = pgframe.step_while_stopped(store, boot, stepped.offset)
        except StateError as exc:
            log.warning("cannot read the clock frame in the state", error=str(exc))
            missed = 0.0
        if missed:
            log.warning("the host clock stepped while this daemon was not leading", seconds=round(missed, 3))
            clock_stepped(rt, missed)
        keep_frame()
        ended = False

        async def term_ends() -> None:
            nonlocal ended
            await leadership.wait_standing_by()
            ended = True
            log.warning("this daemon no longer leads the state: stopping work and standing by")
            rt.stopping.set()

        watching = asyncio.create_task(term_ends(), name="term")
        log.info("this daemon leads the state", epoch=leadership.epoch, host=leadership.host)
        try:
            code = await Daemon(rt, notifier, endpoint=endpoint, on_stop=on_stop).run()
        finally:
            watching.cancel()
        return code, ended, rt.config


def _keep_frame(state_path: Path, boot: str | None, offset: float) -> None:
    try:
        keep_clock_frame(state_path, boot, offset)
    except OSError as exc:
        # Only a step while stopped goes unnoticed then; nothing the daemon does now depends on it.
        log.warning("cannot keep the clock frame beside the state file", error=str(exc))


def clock_stepped(rt: Runtime, seconds: float) -> None:
    """The host's wall clock stepped by `seconds`: move what was timed on the old clock onto the new one.

    Retry times, failure streaks and last successes were written in the old clock's terms: moved
    by the step, a retry due in 5 s is still due in 5 s, and a sink failing for a minute is not
    "failing for two hours" after a forward step. Event and delivery history keeps its times.
    """
    log.warning(
        "the host clock stepped; times kept for retries, failure alerts and health are moved with it",
        seconds=round(seconds, 3),
    )
    rt.metrics.clock_stepped(seconds)
    try:
        moved = rt.store.clock_stepped(seconds)
    except StateError as exc:
        log.error("cannot move retry times after the clock step; they keep the old clock's times", error=str(exc))
        return
    log.info("retry times moved with the clock step", deliveries=moved)
    rt.dispatcher.wake()


async def _wait_for_storage(config: Config, clock: Clock, notifier: Notifier) -> bool:
    """Wait until the state file opens; False when a stop signal came first.

    On a full disk SQLite cannot even open a WAL file (its -shm needs space). Exiting would let
    systemd restart us every RestartSec until StartLimitBurst leaves the unit failed, with nothing
    to start it again once space returns; waiting here keeps the service up and says why. READY=1
    goes out at once, so TimeoutStartSec does not end the wait, and the watchdog is fed meanwhile.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    waiting = False
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            try:
                if config.state.postgres is None:
                    open_store(config.state).close()
                else:
                    from watcher.state.postgres import probe

                    probe(config.state.postgres)
                if waiting:
                    log.warning("state file opens again; starting")
                return True
            except (StateTooNew, StateDamaged):
                raise  # only an upgrade, or the operator's recovery, helps: exit 78 at once
            except StateError as exc:
                if config.state.postgres is None and not config.state.path.parent.is_dir():
                    raise  # a wrong path, not a full disk: say so and exit
                if not waiting:
                    waiting = True
                    wait_for = "until it is writable" if exc.read_only else "for space"
                    log.error(
                        f"state file cannot be opened; waiting {wait_for}", retry_in=STORAGE_RETRY, error=str(exc)
                    )
                    notifier.ready(f"waiting: {exc}")
                notifier.watchdog()
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=STORAGE_RETRY)
        return False
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
