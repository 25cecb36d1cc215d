"""Time as the PHP side of Convertr sees it: wall-clock digits, ISO output, DateFilter input.

Doctrine binds a filter's DateTime as `Y-m-d H:i:s` in the value's own zone and the column
holds server-local digits, so every comparison is between wall-clock digits. A "wall"
here is those digits read as if they were UTC: an integer that orders like the digits do.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from zoneinfo import ZoneInfo

_EPOCH = datetime(1970, 1, 1)

_ISO = re.compile(
    r"^(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})"
    r"(?:[Tt ](?P<H>\d{1,2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:[.,]\d+)?)?)?"
    r"\s*(?P<tz>[Zz]|UTC|GMT|[+-]\d{1,2}(?::?\d{2})?)?$"
)
_SLASHED_YMD = re.compile(r"^(?P<y>\d{4})/(?P<m>\d{1,2})/(?P<d>\d{1,2})$")
_SLASHED_MDY = re.compile(r"^(?P<m>\d{1,2})/(?P<d>\d{1,2})/(?P<y>\d{4})$")
_UNIX = re.compile(r"^@(-?\d+)(?:\.\d+)?$")
_RELATIVE_DAYS = {"today": 0, "midnight": 0, "yesterday": -1, "tomorrow": 1}


def wall_of(ts: float, zone: ZoneInfo) -> int:
    """The server-local wall-clock digits of a Unix time, as an orderable integer."""
    local = datetime.fromtimestamp(int(ts), zone).replace(tzinfo=None)
    return int((local - _EPOCH).total_seconds())


def wall_of_naive(dt: datetime) -> int:
    return int((dt.replace(tzinfo=None, microsecond=0) - _EPOCH).total_seconds())


def iso(ts: float, zone: ZoneInfo) -> str:
    """`2018-06-21T08:52:48+00:00`: second precision, in the server zone."""
    return datetime.fromtimestamp(int(ts), zone).isoformat()


def http_date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(int(ts), UTC), usegmt=True)


def _compose(year: int, month: int, day: int, hour: int, minute: int, second: int) -> datetime | None:
    # PHP rolls over out-of-range parts (2024-02-30 is 1 March, day 0 the month's eve) rather than failing.
    if month > 12 or day > 31 or hour > 24 or minute > 59 or second > 60:
        return None
    months = year * 12 + month - 1
    try:
        first = datetime(months // 12, months % 12 + 1, 1)
    except ValueError:
        return None
    return first + timedelta(days=day - 1, hours=hour, minutes=minute, seconds=second)


def parse_filter_value(value: str, now_wall: int) -> int | None:
    """The wall digits PHP's `new \\DateTime($value)` would bind, or None where it throws.

    Covers the forms a client plausibly sends: ISO 8601 with or without offset, date only,
    `@unix` (always UTC digits in PHP), slashed dates, empty or "now", today/yesterday/tomorrow.
    Other relative phrases PHP understands are treated as unparseable.
    """
    text = value.strip()
    lower = text.lower()
    if lower in ("", "now"):
        return now_wall
    if lower in _RELATIVE_DAYS:
        return now_wall - now_wall % 86400 + 86400 * _RELATIVE_DAYS[lower]
    unix = _UNIX.match(text)
    if unix:
        return int(unix.group(1))
    match = _ISO.match(text) or _SLASHED_YMD.match(text) or _SLASHED_MDY.match(text)
    if match is None:
        return None
    parts = match.groupdict()
    composed = _compose(
        int(parts["y"]),
        int(parts["m"]),
        int(parts["d"]),
        int(parts.get("H") or 0),
        int(parts.get("M") or 0),
        int(parts.get("S") or 0),
    )
    return None if composed is None else wall_of_naive(composed)


def to_unix(value: object, zone: ZoneInfo) -> int | None:
    """A timestamp given to the Python or admin interface: datetime, ISO text or Unix number."""
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=zone)
        return int(dt.timestamp())
    if isinstance(value, bool):
        raise TypeError("a timestamp cannot be a bool")
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        return to_unix(datetime.fromisoformat(value.replace("Z", "+00:00")), zone)
    raise TypeError(f"not a timestamp: {type(value).__name__}")
