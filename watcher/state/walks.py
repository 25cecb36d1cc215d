"""The walks' cursors and snapshots: where each stream has read to, and what it has seen.

A poll's page is written by `commit_page` in one transaction: snapshots, the outbox rows its
changes produced (`enqueued`, on the same transaction), and the cursor that moves past them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from watcher.events import Event, dumps, loads
from watcher.records import FORGOTTEN, CampaignState, LeadState, PageCommit, Unreadable
from watcher.state.connection import Connection, connect_readonly, state_error
from watcher.state.outbox import enqueued
from watcher.state.records import Cursor


class Walks(Connection):
    """Cursors, lead snapshots, campaign statuses, track lists and unreadable leads."""

    @staticmethod
    def history(path: Path) -> int:
        """How many streams the file holds a cursor for, read-only: 0 for a file that is new, empty or
        has lost what it held. StateDamaged when SQLite cannot read it."""
        if not path.is_file() or path.stat().st_size == 0:
            return 0
        conn = connect_readonly(path)
        try:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cursors'").fetchone():
                return 0
            return int(conn.execute("SELECT count(*) FROM cursors").fetchone()[0])
        except sqlite3.Error as exc:
            raise state_error(exc, path, "read") from None
        finally:
            conn.close()

    def cursor(self, stream: str) -> Cursor | None:
        rows = self._rows("SELECT * FROM cursors WHERE stream = ?", (stream,))
        return Cursor(**dict(rows[0])) if rows else None

    def cursors(self) -> list[Cursor]:
        return [Cursor(**dict(r)) for r in self._rows("SELECT * FROM cursors ORDER BY stream")]

    def poll_failed(self, stream: str, now: float, error: str) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO cursors (stream, last_poll_at, last_error) VALUES (?, ?, ?) "
                "ON CONFLICT(stream) DO UPDATE SET last_poll_at = excluded.last_poll_at, "
                "last_error = excluded.last_error",
                (stream, now, error),
            )

    def leads(self, ids: Iterable[int]) -> dict[int, LeadState]:
        wanted = list(ids)
        found: dict[int, LeadState] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = self.dialect.marks(len(chunk))
            sql = f"SELECT id, created_ts, version, snapshot, track, last_event FROM leads WHERE id IN ({marks})"
            for row in self._rows(sql, chunk):
                snap = loads(row["snapshot"])
                found[row["id"]] = LeadState(
                    row["id"], row["created_ts"], row["version"], snap, row["track"], row["last_event"]
                )
        return found

    def campaigns(self) -> dict[int, CampaignState]:
        return {
            r["id"]: CampaignState(r["id"], r["status"], r["transitions"], r["name"], r["last_event"])
            for r in self._rows("SELECT id, status, transitions, name, last_event FROM campaigns")
        }

    def unreadable(self, stream: str | None = None) -> list[Unreadable]:
        """Leads the server could not serialise, oldest first (all streams, or one)."""
        sql = "SELECT stream, lead_id, first_seen, next_try, tries, error, emit_after FROM unreadable"
        params: tuple[Any, ...] = ()
        if stream is not None:
            sql += " WHERE stream = ?"
            params = (stream,)
        return [Unreadable(**dict(r)) for r in self._rows(sql + " ORDER BY first_seen, lead_id", params)]

    def tracks(self) -> dict[str, tuple[str, ...]]:
        """Every track list a stored snapshot was taken under, by signature."""
        return {r["signature"]: tuple(loads(r["track"])) for r in self._rows("SELECT signature, track FROM tracks")}

    def remember_track(self, signature: str, track: Sequence[str]) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO tracks (signature, track) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (signature, dumps(list(track))),
            )

    def reset_stream(self, stream: str) -> None:
        """Forget a stream's cursor row: its next walk starts as a first one."""
        with self.transaction() as c:
            c.execute("DELETE FROM cursors WHERE stream = ?", (stream,))

    def campaign_names(self) -> dict[int, str]:
        return {r["id"]: r["name"] for r in self._rows("SELECT id, name FROM campaigns WHERE name IS NOT NULL")}

    def lead_count(self) -> int:
        return int(self._rows("SELECT count(*) FROM leads")[0][0])

    def commit_page(self, page: PageCommit) -> list[Event]:
        """Write a page's state, outbox rows and cursor in one transaction; return the events that were new."""
        fresh: Callable[[], list[Event]] = list
        with self.transaction() as c:
            if page.leads and self.dialect.arrays:
                # One statement for the page (PostgreSQL): the rows bound as arrays, a lead met twice
                # in the page written once with its last values (as upserting them in turn leaves it).
                last = {int(s.id): s for s in page.leads}
                c.execute(
                    "INSERT INTO leads (id, created_ts, version, snapshot, changed_at, track, last_event) "
                    "SELECT u.id, u.created_ts, u.version, u.snapshot, ?, u.track, u.last_event "
                    "FROM unnest(?::bigint[], ?::float8[], ?::text[], ?::text[], ?::text[], ?::text[]) "
                    "AS u(id, created_ts, version, snapshot, track, last_event) "
                    "ON CONFLICT(id) DO UPDATE SET created_ts = excluded.created_ts, version = excluded.version, "
                    "snapshot = excluded.snapshot, changed_at = excluded.changed_at, track = excluded.track, "
                    "last_event = excluded.last_event "
                    f"WHERE leads.track {self.dialect.distinct} '{FORGOTTEN}'",
                    [
                        page.now,
                        list(last),
                        [float(s.created_ts) for s in last.values()],
                        [s.version for s in last.values()],
                        [dumps(s.snapshot) for s in last.values()],
                        [s.track for s in last.values()],
                        [s.last_event for s in last.values()],
                    ],
                )
            elif page.leads:
                c.executemany(
                    "INSERT INTO leads (id, created_ts, version, snapshot, changed_at, track, last_event) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET created_ts = excluded.created_ts, version = excluded.version, "
                    "snapshot = excluded.snapshot, changed_at = excluded.changed_at, track = excluded.track, "
                    "last_event = excluded.last_event "
                    f"WHERE leads.track {self.dialect.distinct} '{FORGOTTEN}'",  # a forgotten lead stays forgotten
                    [
                        (s.id, s.created_ts, s.version, dumps(s.snapshot), page.now, s.track, s.last_event)
                        for s in page.leads
                    ],
                )
            if page.campaigns:
                c.executemany(
                    "INSERT INTO campaigns (id, status, transitions, name, seen_at, last_event) "
                    "VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET status = excluded.status, transitions = excluded.transitions, "
                    "name = excluded.name, seen_at = excluded.seen_at, last_event = excluded.last_event",
                    [(s.id, s.status, s.transitions, s.name, page.now, s.last_event) for s in page.campaigns],
                )
            wanted = [(event, sinks) for event, sinks in page.events if sinks]  # no sink wants it: nothing to keep
            if wanted:
                fresh = enqueued(c, wanted, page.now, self.dialect)  # read once committed
            c.execute("INSERT INTO cursors (stream) VALUES (?) ON CONFLICT DO NOTHING", (page.stream,))
            if page.cursor is not None:
                c.execute(
                    "UPDATE cursors SET cursor = ?, cursor_ts = ? WHERE stream = ?",
                    (page.cursor, page.cursor_ts, page.stream),
                )
            if page.set_walk_from:
                c.execute(
                    "UPDATE cursors SET walk_from = ?, baseline_until = ? WHERE stream = ?",
                    (page.walk_from, page.baseline_until, page.stream),
                )
            if page.unreadable:
                c.executemany(
                    "INSERT INTO unreadable (stream, lead_id, first_seen, last_tried, next_try, error, emit_after) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(stream, lead_id) DO UPDATE SET "
                    "last_tried = excluded.last_tried, next_try = excluded.next_try, error = excluded.error, "
                    "tries = unreadable.tries + 1",
                    [
                        (page.stream, lead_id, page.now, page.now, due, error, emit_after)
                        for lead_id, due, error, emit_after in page.unreadable
                    ],
                )
            if page.readable or page.settled:
                c.executemany(
                    "DELETE FROM unreadable WHERE stream = ? AND lead_id = ?",
                    [*((page.stream, lead_id) for lead_id in page.readable), *page.settled],
                )
            if page.floor is not None:
                c.execute("UPDATE cursors SET floor = ? WHERE stream = ?", (page.floor, page.stream))
            if page.progress is not None:
                c.execute(
                    "UPDATE cursors SET progress = ?, resume_after = ? WHERE stream = ?",
                    (page.progress or None, page.resume_after if page.progress else None, page.stream),
                )
            if page.finished:
                c.execute(
                    "UPDATE cursors SET last_poll_at = ?, last_success_at = ?, last_error = ?, "
                    "polls = polls + 1 WHERE stream = ?",
                    (page.now, page.now, page.note, page.stream),
                )
        new = fresh()
        if new:
            self._outbox_grew(len(new))
        return new
