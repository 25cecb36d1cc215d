"""The operator's admin: choosing deliveries (`Selection`), replaying, moving, and the listings
(`events`, `status`) read through sqlite-utils."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from watcher.events import Event
from watcher.state.connection import SQLITE, Connection, Dialect, Tx
from watcher.state.records import DEAD, PENDING, Due


def _where(tests: Sequence[tuple[str, Any]], dialect: Dialect = SQLITE) -> tuple[str, list[Any]]:
    """` WHERE …` (or "") and its parameters from (column and operator, value) pairs, ANDed.

    A test ending in IN takes a sequence of values; a None value or an empty sequence drops its test,
    so an unset filter matches everything.
    """
    parts: list[str] = []
    params: list[Any] = []
    for test, value in tests:
        if value is None or (isinstance(value, list | tuple) and not value):
            continue
        if test.endswith(" IN"):
            parts.append(f"{test} ({dialect.marks(len(value))})")
            params += list(value)
        else:
            parts.append(f"{test} {dialect.mark}")
            params.append(value)
    return (f" WHERE {' AND '.join(parts)}" if parts else ""), params


@dataclass(frozen=True)
class Selection:
    """The deliveries an operator means (`replay`): by sink, event id and detection time; empty means any."""

    sinks: Sequence[str] = ()
    event_ids: Sequence[str] = ()
    since: float | None = None
    until: float | None = None

    def tests(self) -> list[tuple[str, Any]]:
        """As `_where` tests on a delivery `d` joined to its event `e`."""
        return [
            ("d.sink IN", self.sinks),
            ("e.id IN", self.event_ids),
            ("e.detected_at >=", self.since),
            ("e.detected_at <", self.until),
        ]


def _update_chosen(
    c: Tx,
    assignments: str,
    values: Sequence[Any],
    tests: Sequence[tuple[str, Any]],
    dialect: Dialect = SQLITE,
) -> int:
    """Apply `assignments` to the deliveries `tests` pick (alias `d`, joined to their event `e`)."""
    where, params = _where(tests, dialect)
    return c.execute(
        f"UPDATE deliveries SET {assignments} WHERE (sink, event_seq) IN "
        f"(SELECT d.sink, d.event_seq FROM deliveries d JOIN events e ON e.seq = d.event_seq{where})",
        [*values, *params],
    ).rowcount


class Admin(Connection):
    """What `replay`, `events`, `status` and the sink moves of a reload do to and read from the outbox."""

    def replay(self, now: float, chosen: Selection, statuses: Sequence[str] = (DEAD,)) -> int:
        """Re-queue the chosen dead or delivered deliveries; they keep their event id. Returns how many."""
        with self.transaction() as c:
            # A replayed delivery starts a fresh schedule: its age for max_age counts from now.
            count = _update_chosen(
                c,
                "status = 'pending', attempts = 0, next_attempt_at = ?, created_at = ?, delivered_at = NULL",
                [now, now],
                [("d.status IN", statuses), *chosen.tests()],
                self.dialect,
            )
            for sink in chosen.sinks:
                c.execute("UPDATE sinks SET disabled_at = NULL, disabled_reason = NULL WHERE name = ?", (sink,))
            return count

    def make_due(self, now: float, chosen: Selection) -> int:
        """Make the chosen pending deliveries that wait out a retry delay due now; ids and attempt counts stay."""
        with self.transaction() as c:
            return _update_chosen(
                c,
                "next_attempt_at = ?",
                [now],
                [("d.status =", PENDING), ("d.next_attempt_at >", now), *chosen.tests()],
                self.dialect,
            )

    def move_sink(
        self, old: str, new: str, now: float, accept: Callable[[Event], bool] = lambda event: True
    ) -> tuple[int, int]:
        """Hand a removed or renamed sink's pending and dead deliveries that `new` accepts (its own
        event types, campaigns and personal-data setting) to it, due now, same event ids.

        Returns (moved, left): events `new` does not want, or already has, stay under `old`.
        Pending ones keep their attempt count; dead ones start a fresh schedule, as a replay does.
        """
        rows = self._rows(
            "SELECT d.event_seq AS seq, d.sink, e.id AS event_id, e.type, d.resource, e.campaign_id, e.payload, "
            "d.attempts, d.created_at FROM deliveries d JOIN events e ON e.seq = d.event_seq "
            "WHERE d.sink = ? AND d.status IN ('pending', 'dead')",
            (old,),
        )
        wanted = [(r["seq"],) for r in rows if accept(Due(**dict(r)).event())]
        with self.transaction() as c:
            moved = 0
            for (seq,) in wanted:
                moved += c.execute(
                    # Not where `new` already has this event (what UPDATE OR IGNORE did, in standard SQL).
                    "UPDATE deliveries SET sink = ?, next_attempt_at = ?, "
                    "attempts = CASE WHEN status = 'dead' THEN 0 ELSE attempts END, "
                    "created_at = CASE WHEN status = 'dead' THEN ? ELSE created_at END, status = 'pending' "
                    "WHERE sink = ? AND event_seq = ? AND status IN ('pending', 'dead') "
                    "AND NOT EXISTS (SELECT 1 FROM deliveries x WHERE x.sink = ? AND x.event_seq = ?)",
                    (new, now, now, old, seq, new, seq),
                ).rowcount
        return moved, len(rows) - moved

    def deliveries(self, sink: str | None = None) -> list[dict[str, Any]]:
        """Every delivery with its event id and type (status output, tests)."""
        sql = (
            "SELECT d.sink, e.id AS event_id, e.type, d.resource, d.status, d.attempts, d.next_attempt_at, "
            "d.last_error, d.created_at, d.delivered_at FROM deliveries d JOIN events e ON e.seq = d.event_seq"
        )
        params: tuple[Any, ...] = ()
        if sink is not None:
            sql += " WHERE d.sink = ?"
            params = (sink,)
        return [dict(r) for r in self._rows(sql + " ORDER BY d.event_seq", params)]

    def attempts(self, sink: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM attempts"
        params: tuple[Any, ...] = ()
        if sink is not None:
            sql += " WHERE sink = ?"
            params = (sink,)
        return [dict(r) for r in self._rows(sql + " ORDER BY id", params)]

    def events(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows("SELECT id, type, resource, payload FROM events ORDER BY seq")]

    def outbox(
        self,
        *,
        sinks: Sequence[str] = (),
        statuses: Sequence[str] = (),
        types: Sequence[str] = (),
        resource: str | None = None,
        since: float | None = None,
        limit: int | None = None,
        after_seq: int | None = None,
    ) -> list[dict[str, Any]]:
        """Deliveries with their event, most recently detected first, as plain dicts (`events`).

        Read through sqlite-utils, whose rows are dicts named by column: what the JSON and CSV
        writers take as they are. The filters are ANDed; an empty one matches everything.
        """
        where, params = _where(
            [
                ("d.sink IN", sinks),
                ("d.status IN", statuses),
                ("e.type IN", types),
                ("d.resource =", resource),
                ("e.detected_at >=", since),
                ("e.seq >", after_seq),
            ],
            self.dialect,
        )
        sql = (
            "SELECT e.seq, e.id, e.type, d.resource, d.sink, d.status, d.attempts, e.detected_at, d.next_attempt_at, "
            f"d.delivered_at, d.last_error FROM deliveries d JOIN events e ON e.seq = d.event_seq{where}"
            " ORDER BY e.seq DESC, d.sink" + (" LIMIT ?" if limit is not None else "")
        )
        return self._query(sql, [*params, limit] if limit is not None else params)

    def last_event_seq(self) -> int:
        """The newest event's sequence number (0 for none): where `events --follow` starts."""
        return int(self._rows("SELECT coalesce(max(seq), 0) FROM events")[0][0])

    def event(self, event_id: str) -> dict[str, Any] | None:
        """One event as detected (its payload is the body before per-sink filtering), or None."""
        rows = self._query("SELECT seq, id, type, resource, payload, detected_at FROM events WHERE id = ?", [event_id])
        return rows[0] if rows else None

    def attempt_log(self, event_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The attempt log of these events, oldest first: answer status, error and answer excerpt."""
        found: list[dict[str, Any]] = []
        for start in range(0, len(event_ids), 500):
            chunk = list(event_ids[start : start + 500])
            found += self._query(
                "SELECT sink, event_id, attempt, at, status_code, duration, error, excerpt FROM attempts "
                f"WHERE event_id IN ({self.dialect.marks(len(chunk))}) ORDER BY id",
                chunk,
            )
        return found
