"""When to try again: the per-sink schedule, jitter, Retry-After and max age.

Pure functions of their arguments (time and randomness are passed in), so the outbox can store
the answer and a restart resumes exactly where it left off. `retry_after_seconds` is the one
reading of a Retry-After header, for the sinks and the Convertr client alike; each caller caps it
to what a wait means there.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime

# However small the scheduled wait, a receiver may ask for up to an hour (see next_attempt_at).
RETRY_AFTER_FLOOR_CAP = 3600.0


def next_delay(attempts_made: int, schedule: Sequence[float], rng: random.Random, jitter: float = 0.2) -> float | None:
    """Seconds to wait after `attempts_made` attempts (0: the first try is immediate); None when exhausted."""
    if attempts_made <= 0:
        return 0.0
    index = attempts_made - 1
    if index >= len(schedule):
        return None
    base = max(0.0, float(schedule[index]))
    # Jitter spreads the retries of many events that failed together (one outage) over time.
    return base * rng.uniform(1.0 - jitter, 1.0 + jitter)


def retry_after_seconds(header: str | None, now: float, cap: float) -> float | None:
    """`Retry-After` (delay-seconds or HTTP-date) as seconds from `now`, in [0, cap]; None if unusable.

    Unusable: absent, blank, not a number or date, not finite ("inf", "1e400"), or a date that
    does not exist ("32 Oct"): a header that says nothing sensible asks for no particular wait.
    """
    if header is None:
        return None
    text = header.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):  # unreadable, or a date the calendar lacks
            return None
        if when.tzinfo is None:
            # HTTP-dates are GMT; a missing zone is read as UTC, never as the host's local time.
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), cap)


def next_attempt_at(
    now: float,
    attempts_made: int,
    schedule: Sequence[float],
    rng: random.Random,
    retry_after: float | None,
    first_seen: float,
    max_age: float,
) -> float | None:
    """Unix time of the next attempt; None when the event is dead (schedule used up, or too old by then)."""
    delay = next_delay(attempts_made, schedule, rng)
    if delay is None:
        return None
    if retry_after is not None:
        # Retry-After raises the wait to at least what the receiver asked, but a receiver must not park
        # an event indefinitely: the wait is capped at 2x the scheduled delay or 1 h, whichever is larger.
        # (Svix clamps to 2x alone; with a 5 s first step that would ignore a plain "Retry-After: 60".)
        cap = max(2.0 * delay, RETRY_AFTER_FLOOR_CAP)
        delay = max(delay, min(retry_after, cap))
    at = now + delay
    if at > first_seen + max_age:
        return None
    return at
