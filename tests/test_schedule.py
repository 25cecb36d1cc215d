"""Retry timing: schedule steps with jitter, Retry-After parsing, and when an event is dead."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from watcher.schedule import next_attempt_at, next_delay, retry_after_seconds

SCHEDULE = (5.0, 300.0, 1800.0, 7200.0)
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("attempts_made", "base"),
    [(0, 0.0), (1, 5.0), (2, 300.0), (3, 1800.0), (4, 7200.0), (5, None), (50, None)],
)
def test_next_delay_follows_the_schedule_within_jitter(attempts_made: int, base: float | None) -> None:
    """The n-th failure waits schedule[n-1] ±20%; past the end there is no next attempt."""
    rng = random.Random(7)
    for _ in range(200):
        delay = next_delay(attempts_made, SCHEDULE, rng)
        if base is None:
            assert delay is None
        else:
            assert delay is not None
            assert base * 0.8 <= delay <= base * 1.2


def test_jitter_is_deterministic_for_a_seed_and_actually_spreads() -> None:
    """Equal seeds give equal delays; many draws are not all the same value."""
    a = [next_delay(2, SCHEDULE, random.Random(3)) for _ in range(3)]
    b = [next_delay(2, SCHEDULE, random.Random(3)) for _ in range(3)]
    assert a == b
    rng = random.Random(3)
    spread = {next_delay(2, SCHEDULE, rng) for _ in range(20)}
    assert len(spread) > 10


def test_zero_jitter_gives_the_exact_step() -> None:
    """With jitter 0 the delay is the configured step."""
    assert next_delay(3, SCHEDULE, random.Random(1), jitter=0.0) == 1800.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("120", 120.0),
        (" 30 ", 30.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-5", 0.0),
        ("999999", 3600.0),
        ("nan", None),
        ("inf", None),  # not finite: says nothing about when, so it asks for no particular wait
        ("-inf", None),
        ("1e400", None),
        ("soon", None),
        ("Wed, 32 Foo 2024 99:00:00 GMT", None),
        ("Thu, 32 Oct 2024 07:28:00 GMT", None),  # a day the calendar lacks is no date
        (formatdate(NOW + 90, usegmt=True), 90.0),
        (formatdate(NOW - 90, usegmt=True), 0.0),
        (formatdate(NOW + 90), 90.0),  # "-0000": no zone given, read as UTC
        (formatdate(NOW + 86_400, usegmt=True), 3600.0),
        (formatdate(NOW + 60, usegmt=True).removesuffix(" GMT"), 60.0),
        (formatdate(NOW + 60, localtime=False).replace("-0000", "+0100"), 0.0),
    ],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    """Seconds or HTTP-date, clamped to [0, cap]; anything unparseable is None."""
    assert retry_after_seconds(header, NOW, cap=3600.0) == expected


def at(
    attempts_made: int,
    retry_after: float | None = None,
    first_seen: float = NOW,
    max_age: float = 3 * 86_400,
    now: float = NOW,
) -> float | None:
    return next_attempt_at(now, attempts_made, SCHEDULE, random.Random(0), retry_after, first_seen, max_age)


def scheduled(attempts_made: int) -> float:
    delay = next_delay(attempts_made, SCHEDULE, random.Random(0))
    assert delay is not None
    return delay


@pytest.mark.parametrize(
    ("attempts_made", "retry_after", "expected_delay"),
    [
        (1, None, "scheduled"),
        (1, 1.0, "scheduled"),  # asking for less than the schedule does not shorten it
        (1, 60.0, 60.0),  # above 2x a 5 s step, still honoured up to the 1 h floor of the cap
        (1, 10_000.0, 3600.0),  # capped at 1 h (2x 5 s is smaller)
        (4, 10_000.0, 10_000.0),  # 2x a ~2 h step allows it
        (4, 100_000.0, "2x"),  # capped at twice the scheduled step
    ],
)
def test_next_attempt_at_honours_retry_after_within_the_cap(
    attempts_made: int, retry_after: float | None, expected_delay: float | str
) -> None:
    """Retry-After raises the wait to at least its value, capped at max(2x scheduled, 1 h)."""
    base = scheduled(attempts_made)
    want = {"scheduled": base, "2x": 2 * base}.get(str(expected_delay), expected_delay)
    assert at(attempts_made, retry_after) == pytest.approx(NOW + float(want))


@pytest.mark.parametrize(
    ("attempts_made", "first_seen", "max_age", "dead"),
    [
        (5, NOW, 1e9, True),  # schedule exhausted
        (1, NOW, 3 * 86_400, False),
        (4, NOW, 3600.0, True),  # the ~2 h wait would land past max_age
        (2, NOW - 86_400, 86_400 + 10.0, True),  # already nearly max_age old
        (2, NOW - 86_400, 86_400 + 400.0, False),
    ],
)
def test_next_attempt_at_is_none_when_dead(attempts_made: int, first_seen: float, max_age: float, dead: bool) -> None:
    """No next attempt once the schedule is used up or the attempt would fall after first_seen + max_age."""
    result = at(attempts_made, first_seen=first_seen, max_age=max_age)
    assert (result is None) is dead
    if not dead:
        assert result == pytest.approx(NOW + scheduled(attempts_made))
