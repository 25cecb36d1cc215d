"""The watchdog's evidence that the daemon is moving, and what /healthz expects of each stream.

The systemd watchdog is fed only while `liveness_problem` finds nothing: a blocked event loop, a
poll stuck on an await that never returns, a scheduler that stopped firing or a delivery loop that
stopped turning all end the pings, and systemd restarts the daemon.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

from watcher.config import Config
from watcher.convertr import RETRY_AFTER_CAP, WINDOW_SECONDS
from watcher.delivery.dispatcher import SWEEP_INTERVAL
from watcher.poller import CAMPAIGNS, CREATED, RECHECK, UPDATED

# A healthy delivery worker turns at least every SWEEP_INTERVAL; far past that it is stuck.
DISPATCH_STALL = max(60.0, 12 * SWEEP_INTERVAL)

# The poll job whose task is running, so an API answer counts as activity for that job only.
JOB: ContextVar[str | None] = ContextVar("watcher_job", default=None)


def stall_limit(config: Config) -> float:
    """The longest a healthy walk can go without any API request finishing.

    The client may wait out a full request-budget window before a request, then one timeout,
    then a retry pause of at most RETRY_AFTER_CAP before the next; anything longer is a hang.
    """
    return WINDOW_SECONDS + RETRY_AFTER_CAP + 2 * config.convertr.timeout


def poll_jobs(config: Config) -> dict[str, float]:
    """The scheduler's poll jobs and their intervals."""
    jobs = {}
    if config.leads.enabled:
        jobs["leads"] = config.leads.interval
    if config.campaigns.enabled:
        jobs["campaigns"] = config.campaigns.interval
    return jobs


def health_intervals(config: Config, updates_filter: bool | None) -> dict[str, float]:
    """Each stream /healthz judges and how often it should succeed.

    `updates_filter` is what the poller learnt from the server: True means `leads.updated` runs on
    every leads poll, False means the re-read fallback (`leads.recheck`) runs every
    recheck_interval instead (beside it too with `quiet_edits`), None means it has not been
    learnt yet (leads.created covers it).
    """
    leads = config.leads
    intervals: dict[str, float] = {}
    if leads.enabled:
        intervals[CREATED] = leads.interval
        if leads.updates and updates_filter is True:
            intervals[UPDATED] = leads.interval
        if leads.updates and (updates_filter is False or (updates_filter is True and leads.quiet_edits)):
            # The re-read rides on a leads poll once it is due: up to one leads interval late.
            intervals[RECHECK] = leads.recheck_interval + leads.interval
    if config.campaigns.enabled:
        intervals[CAMPAIGNS] = config.campaigns.interval
    return intervals


@dataclass
class Liveness:
    """What the watchdog knows, in monotonic seconds."""

    started: float
    intervals: Mapping[str, float]  # poll job -> interval
    stall_limit: float
    dispatcher_limit: float | None = None  # None: no sinks, no delivery loop to watch
    progressed: bool = False
    finished: dict[str, float] = field(default_factory=dict)  # job -> when its last run ended
    running: dict[str, float] = field(default_factory=dict)  # job -> its start or latest API answer
    dispatcher_tick: float | None = None

    def begin(self, job: str, now: float) -> None:
        self.running[job] = now

    def activity(self, job: str | None, now: float) -> None:
        """An API request finished (answered or failed): the walk in `job` is moving."""
        self.progressed = True
        if job is not None and job in self.running:
            self.running[job] = now

    def end(self, job: str, now: float) -> None:
        self.progressed = True
        self.running.pop(job, None)
        self.finished[job] = now

    def tick(self, now: float) -> None:
        self.dispatcher_tick = now


def liveness_problem(live: Liveness, now: float) -> str | None:
    """None while the daemon is proven to move (ping the watchdog), else why it is not."""
    if not live.progressed:
        return "no poll has made progress yet"
    for job, interval in sorted(live.intervals.items()):
        if job in live.running:
            idle = now - live.running[job]
            if idle > live.stall_limit:
                return f"{job} poll: no API request finished for {idle:.0f}s"
        else:
            since = now - live.finished.get(job, live.started)
            if since > interval + live.stall_limit:
                return f"{job} poll: not run for {since:.0f}s (due every {interval:.0f}s)"
    if live.dispatcher_limit is not None:
        since = now - (live.dispatcher_tick if live.dispatcher_tick is not None else live.started)
        if since > live.dispatcher_limit:
            return f"delivery loop: no pass for {since:.0f}s"
    return None
