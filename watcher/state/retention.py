"""Retention and erasure: forgetting a lead, aging out what nothing will send, pruning what was
sent, and moving scheduled times when the host clock steps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from watcher.records import FORGOTTEN
from watcher.state.connection import Connection, Tx


class Retention(Connection):
    """Housekeeping's writes and `forget`."""

    def forget(self, lead_id: int, now: float, *, unseen: bool = True) -> dict[str, int] | None:
        """Erase one lead's personal data: its snapshot, its events' payloads and deliveries, its
        attempt log and unreadable record; keep a bare tombstone so the lead is never announced again.

        With `unseen=False` a lead the state holds nothing about is left alone and None comes back:
        a bare tombstone for a mistyped id would silence some other person's lead for good.

        The backend then clears what the database keeps beside its live rows (`_prepare_erasure`,
        `_erased`): on SQLite, secure_delete zeroes the freed pages and the WAL is checkpointed and
        truncated, so the bytes leave the file; on PostgreSQL, a VACUUM of the touched tables removes
        the rows' old versions (README, "Erasure (`forget`) on PostgreSQL", says what it cannot reach).
        """
        resource = f"lead:{lead_id}"
        self._prepare_erasure()
        with self.transaction() as c:
            if not unseen and not self._knows_lead(c, lead_id, resource):
                return None
            ids = [r[0] for r in c.execute("SELECT id FROM events WHERE resource = ?", (resource,))]
            # By resource too: the attempt log outlives delivered events, whose ids are then gone.
            attempts = c.execute("DELETE FROM attempts WHERE resource = ?", (resource,)).rowcount
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = self.dialect.marks(len(chunk))
                attempts += c.execute(f"DELETE FROM attempts WHERE event_id IN ({marks})", chunk).rowcount
            deliveries = c.execute("DELETE FROM deliveries WHERE resource = ?", (resource,)).rowcount
            events = c.execute("DELETE FROM events WHERE resource = ?", (resource,)).rowcount
            c.execute("DELETE FROM unreadable WHERE lead_id = ?", (lead_id,))
            # The tombstone: a known id with nothing in it, marked so no walk fills it in again and
            # housekeeping never prunes it. The created walk skips known ids.
            c.execute(
                "INSERT INTO leads (id, created_ts, version, snapshot, changed_at, track, last_event) "
                "VALUES (?, ?, NULL, '{}', ?, ?, NULL) ON CONFLICT(id) DO UPDATE SET version = NULL, "
                "snapshot = '{}', changed_at = excluded.changed_at, track = excluded.track, last_event = NULL",
                (lead_id, now, now, FORGOTTEN),
            )
        self._erased(("attempts", "deliveries", "events", "unreadable", "leads"))
        return {"events": events, "deliveries": deliveries, "attempts": attempts}

    @staticmethod
    def _knows_lead(c: Tx, lead_id: int, resource: str) -> bool:
        found = c.execute(
            "SELECT EXISTS (SELECT 1 FROM leads WHERE id = ?) "
            "OR EXISTS (SELECT 1 FROM events WHERE resource = ?) "
            "OR EXISTS (SELECT 1 FROM attempts WHERE resource = ?) "
            "OR EXISTS (SELECT 1 FROM unreadable WHERE lead_id = ?)",
            (lead_id, resource, resource, lead_id),
        ).fetchone()
        return bool(found[0])

    def tombstones(self) -> list[tuple[int, float]]:
        """The leads `forget` erased: (lead id, when), oldest first."""
        sql = "SELECT id, changed_at FROM leads WHERE track = ? ORDER BY changed_at, id"
        return [(int(r["id"]), float(r["changed_at"])) for r in self._rows(sql, (FORGOTTEN,))]

    def age_out(
        self,
        now: float,
        *,
        dead_retention: float,
        configured: Mapping[str, float],
        stopped: Iterable[str],
    ) -> dict[str, int]:
        """Let personal data that nothing will send go: the retention half of housekeeping.

        `configured` maps each configured sink to its max_age; `stopped` names those that are off
        or disabled. Their pending deliveries die once older than max_age (replay can still bring
        them back); dead deliveries go `dead_retention` after they died, and every delivery of a
        sink no longer configured `dead_retention` after it was queued. An event's payload goes
        with its last delivery.
        """
        with self.transaction() as c:
            expired = 0
            for sink in sorted(set(stopped) & set(configured)):
                expired += c.execute(
                    "UPDATE deliveries SET status = 'dead', next_attempt_at = ?, "
                    "last_error = 'max_age passed while the sink was off or disabled' "
                    "WHERE sink = ? AND status = 'pending' AND created_at < ?",
                    (now, sink, now - configured[sink]),
                ).rowcount
            dead = c.execute(
                "DELETE FROM deliveries WHERE status = 'dead' AND next_attempt_at < ?", (now - dead_retention,)
            ).rowcount
            names = sorted(configured)
            marks = self.dialect.marks(len(names))
            removed = c.execute(
                f"DELETE FROM deliveries WHERE sink NOT IN ({marks}) AND created_at < ?",
                [*names, now - dead_retention],
            ).rowcount
            payloads = c.execute("DELETE FROM events WHERE seq NOT IN (SELECT event_seq FROM deliveries)").rowcount
        return {"expired": expired, "dead": dead, "removed_sinks": removed, "payloads": payloads}

    def prune(
        self,
        now: float,
        *,
        delivered_retention: float,
        attempt_retention: float,
        snapshot_retention: float,
    ) -> dict[str, int]:
        """Drop delivered rows, old attempts and stale snapshots so the file stays bounded."""
        with self.transaction() as c:
            delivered = c.execute(
                "DELETE FROM deliveries WHERE status = 'delivered' AND delivered_at < ?",
                (now - delivered_retention,),
            ).rowcount
            c.execute("DELETE FROM events WHERE seq NOT IN (SELECT event_seq FROM deliveries)")
            attempts = c.execute("DELETE FROM attempts WHERE at < ?", (now - attempt_retention,)).rowcount
            snapshots = c.execute(
                f"DELETE FROM leads WHERE changed_at < ? AND track {self.dialect.distinct} ?",
                (now - snapshot_retention, FORGOTTEN),
            ).rowcount
        return {"deliveries": delivered, "attempts": attempts, "snapshots": snapshots}

    def clock_stepped(self, seconds: float) -> int:
        """Move every time that schedules or judges future work by `seconds` (the host clock stepped).

        A pending delivery keeps its wait and its remaining max_age, a failing sink its streak, a
        stream its re-check due time; history (detection, delivery, attempt times) stays as written.
        Returns the pending deliveries moved.
        """
        with self.transaction() as c:
            moved = c.execute(
                "UPDATE deliveries SET next_attempt_at = next_attempt_at + ?, created_at = created_at + ? "
                "WHERE status = 'pending'",
                (seconds, seconds),
            ).rowcount
            c.execute("UPDATE sinks SET failing_since = failing_since + ? WHERE failing_since IS NOT NULL", (seconds,))
            c.execute(
                "UPDATE cursors SET last_success_at = last_success_at + ?, last_poll_at = last_poll_at + ?",
                (seconds, seconds),
            )
            c.execute("UPDATE unreadable SET next_try = next_try + ?", (seconds,))
        return moved
