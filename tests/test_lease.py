"""The leadership lease's pure decisions, by tables of values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from watcher.lease import (
    Action,
    LeaseRow,
    LeaseTimings,
    Role,
    leader_of,
    next_wait,
    standby_action,
    still_leading,
    trusted_until,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(expires_in: float, epoch: int = 3) -> LeaseRow:
    """A lease that ends `expires_in` seconds after the database's now (negative: already ended)."""
    return LeaseRow(epoch, "m1", "host-a", 42, T0 - timedelta(minutes=5), T0 + timedelta(seconds=expires_in), T0)


@pytest.mark.parametrize(
    ("lease", "action"),
    [
        (None, Action.CLAIM),
        (row(10.0), Action.WAIT),
        (row(0.001), Action.WAIT),
        (row(0.0), Action.TAKE_OVER),  # expires_at == now: over
        (row(-0.001), Action.TAKE_OVER),
        (row(-3600.0), Action.TAKE_OVER),
    ],
)
def test_a_standby_acts_on_the_database_clock_only(lease: LeaseRow | None, action: Action) -> None:
    assert standby_action(lease) is action
    assert standby_action(lease, "another member") is action


@pytest.mark.parametrize("expires_in", [10.0, 0.0, -3600.0])
def test_a_row_naming_this_daemon_is_resumed_live_or_not(expires_in: float) -> None:
    """Its own grant, whose answer was lost: renew it (same epoch) rather than wait it out."""
    assert standby_action(row(expires_in), "m1") is Action.RESUME


def test_the_timings_derive_from_the_lease() -> None:
    t = LeaseTimings(15.0)
    assert (t.renew_every, t.poll_every, t.margin, t.op_timeout) == (5.0, 3.0, 3.0, 5.0)
    assert t.takeover_bound == 15.0 + 3.0 + 5.0
    assert LeaseTimings(3.0).takeover_bound == pytest.approx(3.0 + 0.6 + 1.0)
    for bad in (0.0, 0.5, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            LeaseTimings(bad)


@pytest.mark.parametrize(
    ("sent", "now", "leading"),
    [
        (100.0, 100.0, True),
        (100.0, 111.9, True),
        (100.0, 112.0, False),  # ttl 15 - margin 3: stops at 112 whether or not the database answered
        (100.0, 114.9, False),
        (100.0, 99.0, True),  # monotonic never goes back; harmless if asked early
    ],
)
def test_a_leader_trusts_its_lease_until_sent_plus_ttl_minus_margin(sent: float, now: float, leading: bool) -> None:
    t = LeaseTimings(15.0)
    assert trusted_until(sent, t) == 112.0
    assert still_leading(now, trusted_until(sent, t)) is leading
    assert still_leading(now, None) is False


def test_the_lease_outlives_the_leaders_trust_by_the_margin() -> None:
    """The database sets the expiry after the renewal was sent, so a standby can take over only
    after the leader has stopped by its own clock: the gap is the margin, for any lease."""
    for ttl in (1.0, 3.0, 15.0, 60.0):
        t = LeaseTimings(ttl)
        sent = 1000.0
        earliest_db_expiry = sent + ttl  # expires_at = clock_timestamp() at the server (>= sent) + ttl
        assert earliest_db_expiry - trusted_until(sent, t) == pytest.approx(t.margin)
        assert t.margin > 0


@pytest.mark.parametrize(
    ("role", "now", "last_sent", "trusted", "wait"),
    [
        (Role.STANDBY, 50.0, 0.0, None, 3.0),
        (Role.LEADER, 100.0, 100.0, 112.0, 5.0),  # just renewed: next in renew_every
        (Role.LEADER, 103.0, 100.0, 112.0, 2.0),
        (Role.LEADER, 106.0, 100.0, 112.0, 0.0),  # overdue: at once
        (Role.LEADER, 110.0, 108.0, 111.0, 1.0),  # a failed renewal: never sleep past the trust
        (Role.LEADER, 113.0, 108.0, 111.0, 0.0),
    ],
)
def test_next_wait(role: Role, now: float, last_sent: float, trusted: float | None, wait: float) -> None:
    assert next_wait(role, now, last_sent, trusted, LeaseTimings(15.0)) == pytest.approx(wait)


def test_status_shows_a_leader_only_while_its_lease_lasts() -> None:
    assert leader_of(None) is None
    assert leader_of(row(-1.0)) is None
    info = leader_of(row(5.0, epoch=7))
    assert info is not None
    assert (info.host, info.pid, info.epoch, info.since) == ("host-a", 42, 7, T0 - timedelta(minutes=5))
