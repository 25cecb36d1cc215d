"""`convertr-watcher events`: the outbox as operators need it, read from the state file read-only.

One row per delivery (an event and one sink): the event's `webhook-id`, type and resource, the
delivery's status, attempts, detection, delivery and next-attempt times and last error; with
`--attempts`, its attempt log with the start of each answer. `--follow` goes on printing rows as
they appear or change; `show ID` prints one event's body without its personal data. Everything a
receiver or Convertr wrote is scrubbed (known secrets, credential-looking tokens, e-mail addresses)
before it is printed.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from watcher.events import loads
from watcher.logs import known_secrets, scrub
from watcher.pii import strip_pii
from watcher.state.store import Store, open_store_readonly

if TYPE_CHECKING:
    from watcher.config import StateConfig

FORMATS = ("table", "json", "csv")
COLUMNS = ("id", "type", "resource", "sink", "status", "attempts", "detected_at", "delivered_at", "last_error")
# The table is read on a terminal: a long error or answer is cut there (json and csv keep it whole).
TABLE_TEXT = 60
# How often `--follow` reads the state file again: a running daemon's delivery shows within a second.
FOLLOW_INTERVAL = 1.0


@dataclass(frozen=True)
class Query:
    """Which deliveries to list; empty filters match everything."""

    sinks: Sequence[str] = ()
    statuses: Sequence[str] = ()
    types: Sequence[str] = ()
    lead: int | None = None
    since: float | None = None
    limit: int | None = None
    attempts: bool = False
    resource: str | None = None  # "lead:1", "campaign:601": overrides `lead`
    after_seq: int | None = None  # only events detected after this one (`--follow`)


def rfc3339(value: float | None) -> str | None:
    """Unix seconds as an RFC 3339 UTC time with milliseconds (None stays None)."""
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(value: Any, secrets: frozenset[str]) -> Any:
    return scrub(value, secrets) if isinstance(value, str) else value


def _reading(where: Path | StateConfig) -> Store:
    """The state read-only: an SQLite file by its path, or the configured state (SQLite or PostgreSQL)."""
    if isinstance(where, Path):
        return Store.open_readonly(where)
    return open_store_readonly(where)


def read(path: Path | StateConfig, query: Query) -> list[dict[str, Any]]:
    """The matching deliveries as printable rows (times in RFC 3339, text scrubbed), newest first."""
    with _reading(path) as store:
        rows = store.outbox(
            sinks=query.sinks,
            statuses=query.statuses,
            types=query.types,
            resource=query.resource or (None if query.lead is None else f"lead:{query.lead}"),
            since=query.since,
            limit=query.limit,
            after_seq=query.after_seq,
        )
        log = store.attempt_log(sorted({r["id"] for r in rows})) if query.attempts else []
    secrets = known_secrets()
    attempts: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for a in log:
        attempts.setdefault((a["sink"], a["event_id"]), []).append(
            {
                "attempt": a["attempt"],
                "at": rfc3339(a["at"]),
                "status_code": a["status_code"],
                "duration": a["duration"],
                "error": _clean(a["error"], secrets),
                "excerpt": _clean(a["excerpt"], secrets),
            }
        )
    out = []
    for r in rows:
        row = {name: _clean(r[name], secrets) for name in COLUMNS}
        row["seq"] = r["seq"]
        row["detected_at"], row["delivered_at"] = rfc3339(r["detected_at"]), rfc3339(r["delivered_at"])
        row["next_attempt_at"] = rfc3339(r["next_attempt_at"]) if r["status"] == "pending" else None
        if query.attempts:
            row["attempt_log"] = attempts.get((r["sink"], r["id"]), [])
        out.append(row)
    return out


def write(rows: Sequence[dict[str, Any]], fmt: str, out: IO[str] = sys.stdout, *, header: bool = True) -> None:
    """Print rows as JSON lines, CSV (the attempt log as one JSON column) or an aligned table."""
    # The sequence number orders `--follow`; operators know events by their id.
    rows = [{k: v for k, v in row.items() if k != "seq"} for row in rows]
    if fmt == "json":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        names = list(rows[0]) if rows else [*COLUMNS, "next_attempt_at"]
        writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
        if header:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    else:
        _table(rows, out, header=header)


def _cut(text: Any) -> str:
    flat = " ".join(str(text).split()) if text is not None else "-"
    return flat if len(flat) <= TABLE_TEXT else flat[: TABLE_TEXT - 1] + "…"


def _table(rows: Sequence[dict[str, Any]], out: IO[str], *, header: bool = True) -> None:
    head = ("ID", "TYPE", "RESOURCE", "SINK", "STATUS", "TRIES", "DETECTED", "DELIVERED", "NEXT ATTEMPT", "LAST ERROR")
    cells = [
        (
            r["id"],
            r["type"],
            r["resource"],
            r["sink"],
            r["status"],
            str(r["attempts"]),
            r["detected_at"] or "-",
            r["delivered_at"] or "-",
            r["next_attempt_at"] or "-",
            _cut(r["last_error"]),
        )
        for r in rows
    ]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(head)]
    if header:
        out.write("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip() + "\n")
    for row, line in zip(rows, cells, strict=True):
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")
        for a in row.get("attempt_log", []):
            status = a["status_code"] if a["status_code"] is not None else "-"
            what = a["error"] or "ok"
            out.write(
                f"    #{a['attempt']} {a['at']} {status} {a['duration']}s {_cut(what)}; answer: {_cut(a['excerpt'])}\n"
            )
    if not rows and header:
        out.write("(no deliveries match)\n")


def follow(
    path: Path | StateConfig,
    query: Query,
    fmt: str,
    out: IO[str] = sys.stdout,
    *,
    sleep: Callable[[float], None] = time.sleep,
    interval: float = FOLLOW_INTERVAL,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """`events --follow`: the listing, then each delivery of a newer event as it appears and again
    whenever its status or attempt count changes, oldest first, until `stop()` (or Ctrl-C)."""
    with _reading(path) as store:
        start = store.last_event_seq()
    listed = read(path, query)
    write(list(reversed(listed)), fmt, out)
    out.flush()
    # Rows of events detected between `start` and the listing are shown already.
    seen = {(r["id"], r["sink"]): (r["status"], r["attempts"]) for r in listed if r["seq"] > start}
    while not stop():
        sleep(interval)
        changed = []
        for row in reversed(read(path, replace(query, since=None, limit=None, after_seq=start))):
            key, now = (row["id"], row["sink"]), (row["status"], row["attempts"])
            if seen.get(key) != now:
                seen[key] = now
                changed.append(row)
        if changed:
            write(changed, fmt, out, header=False)
            out.flush()


def show(path: Path | StateConfig, event_id: str) -> dict[str, Any] | None:
    """One event for `events show ID`: its body as detected, personal data left out and secrets
    masked (what an `include_pii = false` sink would get), and its delivery to each sink."""
    with _reading(path) as store:
        found = store.event(event_id)
    if found is None:
        return None
    secrets = known_secrets()
    body = loads(found["payload"])
    body["data"] = _scrubbed(strip_pii(body.get("data") or {}), secrets)
    deliveries = [
        {
            k: v
            for k, v in row.items()
            if k in ("sink", "status", "attempts", "delivered_at", "next_attempt_at", "last_error")
        }
        for row in read(path, Query(resource=found["resource"]))
        if row["id"] == event_id
    ]
    return {
        "id": found["id"],
        "type": found["type"],
        "resource": found["resource"],
        "detected_at": rfc3339(found["detected_at"]),
        "body": body,
        "deliveries": deliveries,
    }


def _scrubbed(value: Any, secrets: frozenset[str]) -> Any:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, list):
        return [_scrubbed(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _scrubbed(v, secrets) for k, v in value.items()}
    return value
