"""`convertr-watcher events`: the outbox as operators need it, read from the state file read-only.

One row per delivery (an event and one sink): the event's `webhook-id`, type and resource, the
delivery's status, attempts, detection and delivery times and last error; with `--attempts`, its
attempt log with the start of each answer. Everything a receiver or Convertr wrote is scrubbed
(known secrets, credential-looking tokens, e-mail addresses) before it is printed.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from watcher.logs import known_secrets, scrub
from watcher.store import Store

FORMATS = ("table", "json", "csv")
COLUMNS = ("id", "type", "resource", "sink", "status", "attempts", "detected_at", "delivered_at", "last_error")
# The table is read on a terminal: a long error or answer is cut there (json and csv keep it whole).
TABLE_TEXT = 60


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


def rfc3339(value: float | None) -> str | None:
    """Unix seconds as an RFC 3339 UTC time with milliseconds (None stays None)."""
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(value: Any, secrets: frozenset[str]) -> Any:
    return scrub(value, secrets) if isinstance(value, str) else value


def read(path: Path, query: Query) -> list[dict[str, Any]]:
    """The matching deliveries as printable rows (times in RFC 3339, text scrubbed), newest first."""
    with Store.open_readonly(path) as store:
        rows = store.outbox(
            sinks=query.sinks,
            statuses=query.statuses,
            types=query.types,
            resource=None if query.lead is None else f"lead:{query.lead}",
            since=query.since,
            limit=query.limit,
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
        row["detected_at"], row["delivered_at"] = rfc3339(r["detected_at"]), rfc3339(r["delivered_at"])
        row["next_attempt_at"] = rfc3339(r["next_attempt_at"]) if r["status"] == "pending" else None
        if query.attempts:
            row["attempt_log"] = attempts.get((r["sink"], r["id"]), [])
        out.append(row)
    return out


def write(rows: Sequence[dict[str, Any]], fmt: str, out: IO[str] = sys.stdout) -> None:
    """Print rows as JSON lines, CSV (the attempt log as one JSON column) or an aligned table."""
    if fmt == "json":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        names = list(rows[0]) if rows else [*COLUMNS, "next_attempt_at"]
        writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    else:
        _table(rows, out)


def _cut(text: Any) -> str:
    flat = " ".join(str(text).split()) if text is not None else "-"
    return flat if len(flat) <= TABLE_TEXT else flat[: TABLE_TEXT - 1] + "…"


def _table(rows: Sequence[dict[str, Any]], out: IO[str]) -> None:
    head = ("ID", "TYPE", "RESOURCE", "SINK", "STATUS", "TRIES", "DETECTED", "DELIVERED", "LAST ERROR")
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
            _cut(r["last_error"]),
        )
        for r in rows
    ]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(head)]
    out.write("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip() + "\n")
    for row, line in zip(rows, cells, strict=True):
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")
        for a in row.get("attempt_log", []):
            status = a["status_code"] if a["status_code"] is not None else "-"
            what = a["error"] or "ok"
            out.write(
                f"    #{a['attempt']} {a['at']} {status} {a['duration']}s {_cut(what)}; answer: {_cut(a['excerpt'])}\n"
            )
    if not rows:
        out.write("(no deliveries match)\n")
