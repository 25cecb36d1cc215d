"""The server's clock and zone as learnt from its answers: bounds, narrowing, disagreement, as tables."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from watcher import servertime
from watcher.clock import FakeClock
from watcher.servertime import ServerClock, _lowest_sampled, lowest_offset_in, parse_ts

LONDON = ZoneInfo("Europe/London")


def _instant(text: str) -> float:
    return parse_ts(text).timestamp()


def _digits(stamp: str) -> str:
    return stamp[:19]


def _london() -> ServerClock:
    """London configured, and confirmed by what the server wrote in summer and winter."""
    server = ServerClock(FakeClock(), "Europe/London")
    server.observe("2024-06-01T10:00:00+01:00")
    server.observe("2024-12-01T10:00:00+00:00")
    return server


@pytest.mark.parametrize(
    ("start", "until", "expected"),
    [
        ("2024-05-01T09:50:00+01:00", "2024-05-01T10:00:00Z", "2024-05-01T09:50:00+01:00"),
        # within a week of a clock change the server's own rules may date it differently: the lower offset
        ("2024-04-01T09:50:00+01:00", "2024-04-01T10:00:00Z", "2024-04-01T08:50:00+00:00"),
        ("2024-01-15T09:50:00+00:00", "2024-01-15T11:00:00Z", "2024-01-15T09:50:00+00:00"),
        # spring forward: digits only jump ahead, nothing to widen
        ("2024-03-31T00:45:00+00:00", "2024-03-31T03:00:00Z", "2024-03-31T00:45:00+00:00"),
        # the start lies before a spring change the cursor lies after: winter offset
        ("2024-03-31T00:55:00+00:00", "2024-03-31T03:00:00Z", "2024-03-31T00:55:00+00:00"),
        # fall back inside the window: wall-clock digits repeat 01:00-02:00, so write the lower offset
        ("2024-10-27T01:20:00+01:00", "2024-10-27T03:00:00Z", "2024-10-27T00:20:00+00:00"),
        # the fall-back is long past: no widening
        ("2024-11-20T09:50:00+00:00", "2024-11-20T11:00:00Z", "2024-11-20T09:50:00+00:00"),
        # a fall-back far ahead of the start but before the walk's end still counts
        ("2030-10-27T00:49:00+01:00", "2030-10-27T02:00:00Z", "2030-10-26T23:49:00+00:00"),
    ],
)
def test_bound_in_a_configured_zone(start: str, until: str, expected: str) -> None:
    """A bound is its instant written in the lowest offset the zone takes until the walk's end."""
    server = _london()
    assert server.bound(_instant(start), _instant(until.replace("Z", "+00:00"))) == expected


@pytest.mark.parametrize(
    "change", [datetime(2024, 3, 31, 1, tzinfo=UTC), datetime(2024, 10, 27, 1, tzinfo=UTC)], ids=["spring", "autumn"]
)
def test_every_later_row_sorts_after_the_bound(change: datetime) -> None:
    """Around a clock change, every row written after the bound's instant has higher wall-clock digits,
    and the bound is never more than an hour lower than needed."""
    rng = random.Random(change.month)
    server = _london()
    for _ in range(300):
        start = change + timedelta(seconds=rng.randint(-3 * 3600, 3 * 3600))
        until = start + timedelta(seconds=rng.randint(0, 2 * 3600))
        bound = server.bound(start.timestamp(), until.timestamp())
        assert parse_ts(bound) == start, "a server honouring offsets would read the exact instant"
        rows = [start + timedelta(seconds=s) for s in range(1, int((until - start).total_seconds()) + 1, 61)]
        for row in rows:
            assert _digits(row.astimezone(LONDON).isoformat()) > _digits(bound), (start, bound, row)
        needed = min(_digits(r.astimezone(LONDON).isoformat()) for r in [start + timedelta(seconds=1), *rows])
        slack = datetime.fromisoformat(needed) - datetime.fromisoformat(_digits(bound))
        assert slack <= timedelta(hours=1, seconds=61), (start, bound)


@pytest.mark.parametrize(
    ("zone", "summer", "winter"),
    [
        ("UTC", "+00:00", "+00:00"),
        ("Europe/London", "+01:00", "+00:00"),
        ("America/New_York", "-04:00", "-05:00"),
        ("Asia/Tokyo", "+09:00", "+09:00"),
        ("Australia/Sydney", "+10:00", "+11:00"),
    ],
)
def test_auto_learns_the_zone_from_written_offsets(zone: str, summer: str, winter: str) -> None:
    """With nothing configured, a July and a January timestamp are enough for bounds in the server's own
    digits: never above them, at most an hour below."""
    server = ServerClock(FakeClock())
    server.observe(f"2024-07-01T12:00:00{summer}")
    server.observe(f"2024-01-10T12:00:00{winter}")
    tz = ZoneInfo(zone)
    for when in (datetime(2024, 6, 3, 8, tzinfo=UTC), datetime(2024, 12, 3, 8, tzinfo=UTC)):
        bound = server.bound(when.timestamp(), when.timestamp() + 3600)
        real = when.astimezone(tz).isoformat()
        assert _digits(bound) <= _digits(real)
        gap = datetime.fromisoformat(_digits(real)) - datetime.fromisoformat(_digits(bound))
        assert gap <= timedelta(hours=1), (zone, when, bound)


def test_nothing_learnt_yet_writes_the_lowest_offset_on_earth() -> None:
    """Before any timestamp is seen every zone is possible: bounds are written in UTC-12:00."""
    assert ServerClock(FakeClock()).bound(_instant("2024-06-01T12:00:00+00:00"), None).endswith("-12:00")


def test_a_configured_zone_the_server_contradicts_warns_and_takes_the_lower_offset() -> None:
    """London configured, but the server writes +00:00 in June: a warning, and bounds in +00:00."""
    server = ServerClock(FakeClock(), "Europe/London")
    server.observe("2024-06-01T10:00:00+00:00")
    assert server.disagreement is not None and "Europe/London" in server.disagreement
    assert server.bound(_instant("2024-06-01T09:50:00+00:00"), _instant("2024-06-01T11:00:00+00:00")) == (
        "2024-06-01T09:50:00+00:00"
    )


def test_a_configured_zone_the_server_agrees_with_stays_alone() -> None:
    """Offsets that fit the configured zone narrow nothing and raise no warning."""
    server = ServerClock(FakeClock(), "Europe/London")
    server.observe("2024-06-01T10:00:00+01:00")
    server.observe("2024-12-01T10:00:00+00:00")
    assert server.disagreement is None and [z.key for z in server.candidates] == ["Europe/London"]
    assert server.describe().startswith("Europe/London")


def test_offsets_no_zone_fits_fall_back_to_the_lowest_seen() -> None:
    """A server writing +03:00 and then +00:00 an hour later fits no zone: bounds use +00:00."""
    server = ServerClock(FakeClock())
    server.observe("2024-06-01T10:00:00+03:00")
    server.observe("2024-06-01T08:00:00+00:00")
    assert server.bound(_instant("2024-06-01T09:00:00+00:00"), None).endswith("+00:00")


def test_the_correction_moves_every_bound_back() -> None:
    """A filter check that needed two hours more shifts every bound's offset down by two hours."""
    server = ServerClock(FakeClock(), "UTC")
    server.observe("2024-06-01T08:00:00+00:00")
    server.correction = 7200
    assert server.bound(_instant("2024-06-01T09:00:00+00:00"), None) == "2024-06-01T07:00:00-02:00"


def test_now_follows_the_date_header() -> None:
    """The server's now is our clock plus the skew its last Date header showed."""
    clock = FakeClock(1_000.0)
    server = ServerClock(clock)
    assert server.now() == 1_000.0 and not server.has_date
    server.observe_date(datetime.fromtimestamp(1_300.0, UTC))
    clock.advance(10)
    assert server.now() == 1_310.0


def test_a_configured_zone_counts_only_once_the_server_confirms_it() -> None:
    """Before the server has written a timestamp, a configured zone is a guess: bounds stay at UTC-12:00."""
    server = ServerClock(FakeClock(), "Europe/London")
    assert server.bound(_instant("2024-06-01T12:00:00+00:00"), None).endswith("-12:00")
    server.observe("2024-06-01T10:00:00+01:00")
    assert server.bound(_instant("2024-06-01T12:00:00+00:00"), _instant("2024-06-01T13:00:00+00:00")).endswith("+01:00")


def test_far_future_and_garbled_timestamps_teach_nothing() -> None:
    """A year-9999 end date or a garbled value is passed over, never an exception."""
    server = ServerClock(FakeClock())
    for raw in ("9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00+14:00", "2024-13-45T99:00:00+00:00", 42, None):
        server.observe(raw)
    assert server.candidates == ()


@pytest.mark.parametrize("zone", ["Europe/London", "America/Boise", "Asia/Nicosia", "Africa/Casablanca", "UTC"])
def test_the_lowest_offset_from_transitions_matches_sampling_the_clock(zone: str) -> None:
    """Reading a zone's transitions gives the offset that sampling it every 12 hours finds, never higher."""
    tz = ZoneInfo(zone)
    rng = random.Random(zone)
    for _ in range(200):
        start = rng.uniform(0, 2.3e9)
        until = start + rng.choice([3600.0, 20 * 86400.0, 200 * 86400.0, 3000 * 86400.0])
        exact = lowest_offset_in(tz, start, until)
        sampled = _lowest_sampled(tz, start, until)
        # Past the zone file's last transition a year or more is taken as the rule's lower offset.
        assert exact == sampled or (exact < sampled and until > 2.1e9), (start, until)


def test_a_26_year_window_over_every_zone_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backfill from 2000 asks dozens of zones for 26 years: transitions answer it, at most a year is ever sampled."""
    server = ServerClock(FakeClock(_instant("2026-11-28T00:00:00Z")))
    server.observe("2026-11-28T00:00:00+00:00")
    assert len(server.candidates) > 20
    sampled: list[float] = []
    original = servertime._lowest_sampled

    def measured(zone: ZoneInfo, start: float, until: float) -> timedelta:
        sampled.append(until - start)
        return original(zone, start, until)

    monkeypatch.setattr(servertime, "_lowest_sampled", measured)
    assert server.bound(_instant("2000-01-01T00:00:00Z")) == "2000-01-01T00:00:00+00:00"
    assert all(span < 366 * 86400 for span in sampled)
