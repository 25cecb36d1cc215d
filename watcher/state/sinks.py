"""Sink health: which sinks are disabled and why, since when each has been failing, their counts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from watcher.state.connection import Connection, Tx
from watcher.state.records import DEAD, DELIVERED, PENDING, Recorded, SinkState


def note_health(c: Tx, attempts: Sequence[Recorded]) -> None:
    """On the open transaction `c`: each attempt's sink succeeded (its failing streak ends) or failed."""
    # What the attempts, taken in order, leave of each sink's health: its last success and failure,
    # and where its current failing streak began (a failure after a success starts one, a success
    # ends it). One statement per sink, not one per attempt: a flush holds dozens of attempts.
    health: dict[str, tuple[float | None, float | None, bool, float | None]] = {}
    for a in attempts:
        succeeded, failed, ended, streak = health.get(a.sink, (None, None, False, None))
        if a.success:
            health[a.sink] = (a.now, failed, True, None)
        else:
            health[a.sink] = (succeeded, a.now, ended, a.now if streak is None else streak)
    c.executemany("INSERT INTO sinks (name) VALUES (?) ON CONFLICT DO NOTHING", [(sink,) for sink in health])
    c.executemany(
        "UPDATE sinks SET last_success_at = coalesce(?, last_success_at), "
        "last_failure_at = coalesce(?, last_failure_at), "
        "failing_since = CASE WHEN ? THEN ? ELSE coalesce(failing_since, ?) END WHERE name = ?",
        [
            (succeeded, failed, ended, streak, streak, sink)
            for sink, (succeeded, failed, ended, streak) in health.items()
        ],
    )


class Sinks(Connection):
    """The `sinks` table and each sink's delivery counts."""

    def disable_sink(self, sink: str, now: float, reason: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO sinks (name) VALUES (?) ON CONFLICT DO NOTHING", (sink,))
            c.execute("UPDATE sinks SET disabled_at = ?, disabled_reason = ? WHERE name = ?", (now, reason, sink))

    def sync_sink(self, sink: str, fingerprint: str) -> bool:
        """Record a sink's configuration; a changed one is re-enabled. Returns whether it is disabled."""
        with self.transaction() as c:
            c.execute("INSERT INTO sinks (name, fingerprint) VALUES (?, ?) ON CONFLICT DO NOTHING", (sink, fingerprint))
            row = c.execute("SELECT fingerprint, disabled_at FROM sinks WHERE name = ?", (sink,)).fetchone()
            if row[0] != fingerprint:
                c.execute(
                    "UPDATE sinks SET fingerprint = ?, disabled_at = NULL, disabled_reason = NULL WHERE name = ?",
                    (fingerprint, sink),
                )
                return False
            return row[1] is not None

    def enable_sinks(self, sinks: Sequence[str]) -> None:
        """Clear a refusal's disable mark (`replay --sink`): a running daemon resumes the sink within a sweep."""
        with self.transaction() as c:
            c.executemany(
                "UPDATE sinks SET disabled_at = NULL, disabled_reason = NULL WHERE name = ?", [(s,) for s in sinks]
            )

    def sink_disabled(self, sink: str) -> bool:
        """Whether the sink is disabled in the state file (another process may have enabled it)."""
        rows = self._rows("SELECT disabled_at FROM sinks WHERE name = ?", (sink,))
        return bool(rows) and rows[0][0] is not None

    def failing_since(self, sink: str) -> float | None:
        """When the sink's current run of failures began (None: its last attempt succeeded)."""
        rows = self._rows("SELECT failing_since FROM sinks WHERE name = ?", (sink,))
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def sink_state(self, sink: str) -> SinkState:
        """One sink's counts and health (cheaper than `sink_states` with many sinks)."""
        return self.sink_states([sink], only=True)[0]

    def sink_states(self, names: Iterable[str], *, only: bool = False) -> list[SinkState]:
        """Counts and health of `names` and of every sink with deliveries (with `only`: of `names` alone)."""
        wanted = sorted(set(names))
        marks = self.dialect.marks(len(wanted))
        params: list[Any] = wanted if only else []
        known = {
            r["name"]: r
            for r in self._rows("SELECT * FROM sinks" + (f" WHERE name IN ({marks})" if only else ""), params)
        }
        only_sinks = f" AND sink IN ({marks})" if only else ""
        # Two queries, not one: the counts come from the covering index alone, which is several
        # times faster on a large backlog than reading every row for its created_at.
        counts: dict[str, dict[str, int]] = {}
        for r in self._rows(
            f"SELECT sink, status, count(*) AS n FROM deliveries WHERE true {only_sinks} GROUP BY sink, status", params
        ):
            counts.setdefault(r["sink"], {})[r["status"]] = r["n"]
        oldest = {
            r["sink"]: r["oldest"]
            for r in self._rows(
                "SELECT sink, min(created_at) AS oldest FROM deliveries "
                f"WHERE status = 'pending' {only_sinks} GROUP BY sink",
                params,
            )
        }
        states = []
        for name in sorted(set(wanted) | set(counts)):
            row = known.get(name)
            c = counts.get(name, {})
            states.append(
                SinkState(
                    name=name,
                    disabled_at=row["disabled_at"] if row else None,
                    disabled_reason=row["disabled_reason"] if row else None,
                    failing_since=row["failing_since"] if row else None,
                    last_success_at=row["last_success_at"] if row else None,
                    pending=c.get(PENDING, 0),
                    dead=c.get(DEAD, 0),
                    delivered=c.get(DELIVERED, 0),
                    oldest_pending_at=oldest.get(name),
                )
            )
        return states
