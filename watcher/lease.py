"""The leadership lease's decisions, pure: given the lease row and the clocks, what a daemon does.

One daemon leads a PostgreSQL state; the others stand by. The leader holds a lease row whose
expiry is set by the DATABASE clock (`clock_timestamp() + ttl`), renews it every ttl/3, and each
grant carries an epoch that only grows. A standby takes the lease over once it has expired by
the database clock, bumping the epoch; every write transaction of the leader checks its epoch
inside the transaction (watcher.leadership.fence), so a deposed leader commits nothing once a
standby has taken over, whatever its own clock or scheduler did.

The leader also stops on its own: it trusts its lease until `sent + ttl - margin` on its
monotonic clock, where `sent` is when it sent the renewal that succeeded. The database set the
expiry after that moment, so the lease really lasts at least until `sent + ttl`: a leader cut off
from the database stops work `margin` before any standby can take over, even though nothing tells
it the connection is gone. Host clock steps change neither clock used here.

I/O lives in watcher.leadership; this module only decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Role(StrEnum):
    LEADER = "leader"
    STANDBY = "standby"


class Action(StrEnum):
    """What a standby does after reading the lease row."""

    CLAIM = "claim"  # no row: insert one, its epoch from the database clock (never an epoch used before)
    TAKE_OVER = "take_over"  # the lease expired by the database clock: take it, epoch + 1
    WAIT = "wait"  # another daemon holds a live lease
    RESUME = "resume"  # the row names this daemon: a grant whose answer was lost, renew it


# `[state] lease` (watcher.config): the default, and the range a configuration may choose from.
# Below 3 s, op_timeout (lease/3) would cap every query of the leader's sessions, its store's
# included, under 1 s, and each leadership step (connect, make the tables, look, take over) must
# fit in it: already at 3 s a 100 ms round trip never leads (docs/leadership.md, Limits), so any
# shorter and a busy database would depose a healthy leader. Above 5 min, a crash leaves nobody
# working for over 7 min (takeover_bound = 1.53 leases), longer than an operator takes to act.
DEFAULT_TTL = 15.0
MIN_TTL = 3.0
MAX_TTL = 300.0


@dataclass(frozen=True)
class LeaseTimings:
    """The lease's clock. Every other duration derives from `ttl`, so one number tunes failover.

    Defaults: a 15 s lease, renewed every 5 s; a standby looks every 3 s; a leader that could not
    renew stops 3 s before its lease can end. Failover after a crash or a partition is at most
    `takeover_bound` (about 20 s at the defaults).
    """

    ttl: float = DEFAULT_TTL

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ttl) and self.ttl >= 1.0):
            raise ValueError("the lease must last at least 1 s")

    @property
    def renew_every(self) -> float:
        """Three renewals per lease: two may fail (a slow query, a reconnect) before it is at risk."""
        return self.ttl / 3

    @property
    def poll_every(self) -> float:
        """How often a standby reads the lease: one indexed SELECT, cheap enough at ttl/5."""
        return self.ttl / 5

    @property
    def margin(self) -> float:
        """How long before the lease's end a leader that could not renew stops work.

        Covers the work in hand finishing (each write also fenced), and rate differences
        between the host's monotonic clock and the database's clock over one lease.
        """
        return self.ttl / 5

    @property
    def op_timeout(self) -> float:
        """The longest one leadership query may take (statement_timeout, lock_timeout, the client deadline)."""
        return self.ttl / 3

    @property
    def takeover_bound(self) -> float:
        """After the leader dies or is cut off at time t, a standby leads by t + this at the latest.

        The lease was last renewed at or before t, so it ends by t + ttl (database clock); a
        standby reads it within poll_every after that and its takeover query takes at most
        op_timeout. A transaction the cut-off leader left open cannot hold the takeover back
        longer: the server ends one left idle after idle_in_transaction_session_timeout
        (op_timeout), well inside the lease, and the standby itself ends, before it takes the
        row, every session of the expired holder still busy (one cut off mid-pipeline waits in
        ClientRead, beyond any timeout); its FOR UPDATE then waits the moment they take to go. Where its
        database role may not end them (another role, without pg_signal_backend), only the
        server's TCP keepalives do, and behind a proxy that still acknowledges there is no bound.
        """
        return self.ttl + self.poll_every + self.op_timeout


@dataclass(frozen=True)
class LeaseRow:
    """The lease as read from the database, with the database's clock at the time of reading."""

    epoch: int
    holder: str  # the member id of the process that holds it
    host: str
    pid: int
    since: datetime  # when this epoch began
    expires_at: datetime
    db_now: datetime

    @property
    def expired(self) -> bool:
        return self.expires_at <= self.db_now


def standby_action(row: LeaseRow | None, member: str | None = None) -> Action:
    """What a standby (member id `member`) does with the lease it read: only the database's clock decides expiry.

    A row naming this very daemon is a lease it won or renewed without hearing the answer (a
    timeout, a connection lost after the COMMIT reached the server), or one its watchdog gave up
    on: waiting for it to expire would leave nobody leading for a lease; renewing it is safe, as
    its epoch is unchanged only if nobody led since.
    """
    if row is None:
        return Action.CLAIM
    if member is not None and row.holder == member:
        return Action.RESUME
    return Action.TAKE_OVER if row.expired else Action.WAIT


def trusted_until(sent: float, timings: LeaseTimings) -> float:
    """Until when (monotonic) a leader may work after a renewal sent at `sent` succeeded."""
    return sent + timings.ttl - timings.margin


def still_leading(now: float, trusted: float | None) -> bool:
    """Whether a leader may start work now (monotonic `now`, `trusted` from trusted_until)."""
    return trusted is not None and now < trusted


def next_wait(role: Role, now: float, last_sent: float, trusted: float | None, timings: LeaseTimings) -> float:
    """Seconds until the next leadership query: a renewal every renew_every, a standby's look every poll_every.

    A leader whose last renewal failed tries again at the same rhythm, but never sleeps past the
    moment it stops trusting its lease (the watchdog demotes it then, with or without an answer).
    """
    if role is Role.STANDBY:
        return timings.poll_every
    wait = last_sent + timings.renew_every - now
    if trusted is not None:
        wait = min(wait, trusted - now)
    return max(0.0, wait)


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads, for status: None in its place means nobody does (no row, or the lease expired)."""

    host: str
    pid: int
    epoch: int
    since: datetime
    expires_at: datetime


def leader_of(row: LeaseRow | None) -> LeaderInfo | None:
    if row is None or row.expired:
        return None
    return LeaderInfo(row.host, row.pid, row.epoch, row.since, row.expires_at)
