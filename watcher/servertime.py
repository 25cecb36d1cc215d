"""The server's clock and time zone, learnt from what it answers rather than assumed.

Convertr compares date filters as wall-clock digits in its own zone with the offset dropped, so
a filter bound must be written in an offset no higher than the one the server's digits carry at
every moment the walk covers. Which zone that is cannot be configured safely (the API's own
examples show UTC in some years and London in others), but the server tells us: every timestamp
it writes carries the offset of its zone at that instant, and its `Date` header gives its clock.

`ServerClock` keeps the IANA zones consistent with every (instant, offset) pair the server has
written and writes bounds in the lowest offset any of them takes over a window: when in doubt
it reads a little more, never less. Offsets are compared on at most one instant per offset and
day, so feeding it every lead of a backfill costs a string slice per timestamp.

Nothing here does I/O: the poller feeds responses in and asks for bounds.
"""

from __future__ import annotations

import importlib
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from watcher.clock import Clock

HOUR = 3600.0
# Zones keep an offset for months; sampling every 12 hours never steps over a change.
_STEP = timedelta(hours=12)
# With nothing learnt yet every zone is possible, and the lowest offset on Earth is UTC−12.
_LOWEST_POSSIBLE = timedelta(hours=-12)
# Convertr's PHP carries its own zone database, which may date a clock change differently from
# this host's (a country that changed its rules): within a week of any candidate's change the
# lower offset of the two is assumed. It costs an hour of re-reading two weeks a year.
RULES_MARGIN = 7 * 86400.0
_LOWEST_WRITABLE = timedelta(hours=-23, minutes=-59)
_YEAR = 366 * 86400.0


@cache
def all_zones() -> tuple[ZoneInfo, ...]:
    """Every IANA zone this host (or the tzdata package) knows, loaded once."""
    zones = []
    for name in sorted(available_timezones()):
        try:
            zones.append(ZoneInfo(name))
        except (ZoneInfoNotFoundError, ValueError, OSError):
            continue
    return tuple(zones)


def parse_ts(raw: str) -> datetime:
    """An API timestamp (`2018-06-21T08:52:48+00:00`) as an aware datetime; naive ones are taken as UTC."""
    value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def offset_of(zone: ZoneInfo, instant: float) -> timedelta | None:
    """The zone's offset at `instant`; None where the instant cannot be written in it (year 9999 east of UTC)."""
    try:
        return datetime.fromtimestamp(instant, zone).utcoffset() or timedelta()
    except (OverflowError, ValueError, OSError):
        return None


def lowest_offset_in(zone: ZoneInfo, start: float, until: float) -> timedelta:
    """The lowest UTC offset `zone` takes at any moment from `start` to `until`."""
    exact = _lowest_from_transitions(zone, start, max(start, until))
    return exact if exact is not None else _lowest_sampled(zone, start, until)


@cache
def _transitions(key: str) -> tuple[tuple[float, ...], tuple[timedelta, ...], timedelta, tuple[timedelta, ...]] | None:
    """A zone's transitions read from its TZif data: (UTC instants, offset after each, offset
    before the first, offsets its rule string can take after the last); None if unreadable.

    The standard library's pure-Python zoneinfo parses the file; its fields are not public API,
    so anything unexpected falls back to sampling the C implementation.
    """
    try:
        pure: Any = importlib.import_module("zoneinfo._zoneinfo")
        zone = pure.ZoneInfo.no_cache(key)
        trans = tuple(float(t) for t in zone._trans_utc)
        after = tuple(tti.utcoff for tti in zone._ttinfos)
        before = zone._tti_before.utcoff if zone._tti_before is not None else None
        rule = zone._tz_after
        later = (rule.std.utcoff, rule.dst.utcoff) if hasattr(rule, "std") else (rule.utcoff,)
    except Exception:  # private fields moved, or a zone only the C implementation reads
        return None
    if len(trans) != len(after) or not all(isinstance(o, timedelta) for o in (*after, *later)):
        return None
    return trans, after, before if before is not None else later[0], later


def _lowest_from_transitions(zone: ZoneInfo, start: float, until: float) -> timedelta | None:
    table = _transitions(zone.key)
    if table is None:
        return None
    trans, after, before, later = table
    first = bisect_right(trans, start)  # transitions up to `start` are behind it
    last = bisect_right(trans, until)
    offsets = [after[first - 1] if first else before, *after[first:last]]
    if last == len(trans):
        # Past the last listed transition the zone's rule string decides (from 2037 in full
        # files, much earlier in "slim" ones): a year or more of it takes every offset it has,
        # a shorter stretch is sampled.
        tail = max(start, trans[-1]) if trans else start
        offsets += later if until - tail >= _YEAR else [_lowest_sampled(zone, tail, until)]
    return min(offsets)


def _lowest_sampled(zone: ZoneInfo, start: float, until: float) -> timedelta:
    t = datetime.fromtimestamp(start, UTC)
    end = datetime.fromtimestamp(max(start, until), UTC)
    lowest = t.astimezone(zone).utcoffset() or timedelta()
    while t < end:
        t = min(t + _STEP, end)
        lowest = min(lowest, t.astimezone(zone).utcoffset() or timedelta())
    return lowest


def _plausible(instant: float) -> bool:
    """An instant every zone can write (years 1 to 9998): anything else teaches nothing."""
    return -62_000_000_000 < instant < 253_000_000_000


def write_at(instant: float, offset: timedelta) -> str:
    """Unix seconds as an API timestamp in a fixed offset: second precision."""
    return datetime.fromtimestamp(int(instant), timezone(offset)).isoformat(timespec="seconds")


class ServerClock:
    """What the server has shown of its clock and zone; fed by every response of a walk."""

    def __init__(self, clock: Clock, configured: str = "auto") -> None:
        self._clock = clock
        self._skew: float | None = None
        self.configured = None if configured == "auto" else ZoneInfo(configured)
        # None: not narrowed yet (every zone is possible), which is never materialised for the
        # configured case: a configured zone starts as the only candidate.
        self._candidates: tuple[ZoneInfo, ...] | None = (self.configured,) if self.configured else None
        self._checked: set[tuple[str, str]] = set()
        self._observations: list[tuple[float, timedelta]] = []
        self.disagreement: str | None = None  # set when the configured zone contradicts the server
        self._fits = True  # False once no known zone fits everything the server wrote
        # Seconds the filter check found the server's digits to run behind the offsets it writes
        # (0 on every server seen so far); subtracted from every bound.
        self.correction = 0.0

    # --- feeding ------------------------------------------------------------------------------

    def observe_date(self, date: datetime | None) -> None:
        if date is not None:
            self._skew = date.timestamp() - self._clock.now()

    def observe(self, raw: object) -> None:
        """Learn from one timestamp the server wrote; garbled values teach nothing."""
        if not isinstance(raw, str) or len(raw) < 20:
            return
        key = (raw[:10], raw[19:])  # (date, offset text): one check per offset and day
        if key in self._checked:
            return
        self._checked.add(key)
        try:
            stamp = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            return
        offset = stamp.utcoffset()
        if offset is None or not _plausible(stamp.timestamp()):
            return
        self._narrow(stamp.timestamp(), offset)

    def observe_documents(self, docs: Iterable[Mapping[str, Any]], fields: tuple[str, ...]) -> None:
        for doc in docs:
            for name in fields:
                self.observe(doc.get(name))

    def _narrow(self, instant: float, offset: timedelta) -> None:
        self._observations.append((instant, offset))
        pool = self._candidates if self._candidates is not None else all_zones()
        kept = tuple(z for z in pool if offset_of(z, instant) == offset)
        if kept:
            self._candidates = kept
            return
        if self.configured is not None and self.disagreement is None:
            self.disagreement = (
                f"the server wrote {write_at(instant, offset)}, which {self.configured.key} never shows at that "
                "instant: its filters are bounded in the lower of the two from now on"
            )
        # Widen to every zone that fits all the server has written, keeping the configured one
        # (the lower bound of both is the safe choice). If none fits, the offsets seen decide.
        fitting = tuple(z for z in all_zones() if all(offset_of(z, t) == o for t, o in self._observations))
        self._fits = bool(fitting)
        self._candidates = tuple(dict.fromkeys((*fitting, *((self.configured,) if self.configured else ()))))

    # --- reading ------------------------------------------------------------------------------

    @property
    def has_date(self) -> bool:
        return self._skew is not None

    def now(self) -> float:
        """The server's time now (our clock when it never sent a `Date`)."""
        return self._clock.now() + (self._skew or 0.0)

    @property
    def candidates(self) -> tuple[ZoneInfo, ...]:
        return self._candidates if self._candidates is not None else ()

    def lowest_offset(self, start: float, until: float) -> timedelta:
        """The lowest offset the server's zone can take from `start` to `until`."""
        if self._candidates is None or (self.configured is not None and not self._observations):
            # Nothing learnt yet, or only a configured zone the server has not confirmed.
            lowest = _LOWEST_POSSIBLE
        else:
            offsets = [
                lowest_offset_in(z, max(start - RULES_MARGIN, -62_000_000_000), until + RULES_MARGIN)
                for z in self._candidates
            ]
            if not self._fits or self.disagreement is not None:
                offsets += [o for _, o in self._observations]
            lowest = min(offsets)
        return lowest - timedelta(seconds=self.correction)

    def bound(self, instant: float, until: float | None = None) -> str:
        """`instant` written so its digits sort at or before those of every row the server writes from
        then until `until` (default: an hour from the server's now): a `[strictly_after]` value."""
        end = self.now() + HOUR if until is None else until
        offset = self.lowest_offset(instant, end)
        if offset < _LOWEST_WRITABLE:
            # An offset must stay within a day: the same digits, written as an earlier instant.
            instant -= (_LOWEST_WRITABLE - offset).total_seconds()
            offset = _LOWEST_WRITABLE
        return write_at(instant, offset)

    def describe(self) -> str:
        """One line for `check --connect` and the log: what the zone was learnt to be."""
        if self._candidates is None:
            zone = "unknown yet (no timestamp seen): bounds are written in UTC-12:00"
        elif not self._fits:
            zone = "fits no known zone: bounds use the lowest offset seen"
        else:
            names = [z.key for z in self._candidates]
            if self.configured is not None and names == [self.configured.key]:
                zone = f"{self.configured.key} (configured; the server agrees)"
            else:
                shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                zone = f"one of {shown}"
        if self.correction:
            zone += f"; filters compare {self.correction / HOUR:g} h behind the offsets written"
        return zone
