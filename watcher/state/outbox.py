"""The outbox queue: events waiting for their sinks, read in order, and what each attempt did.

The outbox is two tables: `events` (one row per detected change, its id unique, the body sent)
and `deliveries` (one row per event and matching sink: status, attempts, next attempt time, last
error, created and delivered times). Storing the body once keeps the file small with many sinks.
Rows enter through `enqueue`, which writes on the transaction its caller holds open, so the
cursor that produced them moves in the same commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from watcher.events import Event, dumps
from watcher.state.connection import SQLITE, Connection, Dialect, Tx
from watcher.state.records import Due, Outcome, Recorded
from watcher.state.sinks import note_health

# Busy deliveries up to this many are left out by a due read's query (well below SQLite's limit of
# bound parameters); more are read and dropped in Python.
BUSY_IN_QUERY = 2000


def _due_when(now: float, passing: float | None, alias: str = "d") -> tuple[str, list[Any]]:
    """Delivery `alias` is due by `now` and, during a `once` pass that began at `passing`, not yet
    attempted in it.

    An attempt in the pass either settled the delivery or moved its next time past the pass's
    start and counted it; events committed during the pass have no attempt yet. So nothing needs
    remembering per delivery (a set that would grow with the pass). A schedule step of zero on a
    clock that stands still is the exception the dispatcher covers itself.
    """
    when = f"{alias}.next_attempt_at <= ?"
    if passing is None:
        return when, [now]
    return f"{when} AND ({alias}.attempts = 0 OR {alias}.next_attempt_at <= ?)", [now, passing]


def _due_where(sink: str, now: float, passing: float | None) -> tuple[str, list[Any]]:
    """The pending deliveries of `sink` (alias `d`) that a read at `now` takes (see `_due_when`)."""
    when, params = _due_when(now, passing)
    return f"d.sink = ? AND d.status = 'pending' AND {when}", [sink, *params]


def enqueue(c: Tx, events: list[tuple[Event, Sequence[str]]], now: float, dialect: Dialect = SQLITE) -> list[Event]:
    """Insert events not stored before, with a pending delivery per sink, on the open transaction
    `c` (the caller's, which commits them with the cursor that found them); return the new ones.

    An event id already present means the same change was committed before (an overlap
    re-read, a restart): its deliveries exist, so nothing is added for it.
    """
    return enqueued(c, events, now, dialect)()


def enqueued(
    c: Tx, events: list[tuple[Event, Sequence[str]]], now: float, dialect: Dialect = SQLITE
) -> Callable[[], list[Event]]:
    """`enqueue`, its answer read by the function it returns: on PostgreSQL, called once the
    transaction has committed, it reads what the commit's one round trip brought back, rather
    than waiting for the server halfway through the transaction."""
    if dialect.arrays:
        return _enqueue_in_sets(c, events, now)
    found = _enqueue_rows(c, events, now, dialect)
    return lambda: found


def _enqueue_rows(c: Tx, events: list[tuple[Event, Sequence[str]]], now: float, dialect: Dialect) -> list[Event]:
    """`enqueue` a statement per row (SQLite)."""
    resources = sorted({e.resource for e, _ in events})
    ids = [e.id for e, _ in events]
    # Two IN lists (not a row-value IN, which SQLite answers with a full scan) so the
    # (resource, id) index is searched; the ids alone decide what is known.
    known = {
        row[0]
        for row in c.execute(
            f"SELECT id FROM events WHERE resource IN ({dialect.marks(len(resources))}) "
            f"AND id IN ({dialect.marks(len(ids))})",
            [*resources, *ids],
        )
    }
    new: dict[str, tuple[Event, Sequence[str]]] = {}
    for event, sinks in events:
        if event.id not in known:
            new.setdefault(event.id, (event, sinks))
    if not new:
        return []
    rows = [(e.id, e.type, e.resource, e.campaign_id, dumps(e.envelope()), now) for e, _ in new.values()]
    insert = "INSERT INTO events (id, type, resource, campaign_id, payload, detected_at) VALUES "
    if dialect.returning:
        # Each seq as the database gave it (a sequence may skip numbers), matched back by event id:
        # multi-row VALUES in chunks, well inside PostgreSQL's 65535 bound parameters a statement.
        seqs: dict[str, int] = {}
        for start in range(0, len(rows), 1000):
            chunk = rows[start : start + 1000]
            values = ", ".join([f"({dialect.marks(6)})"] * len(chunk))
            found = c.execute(f"{insert}{values} RETURNING id, seq", [v for row in chunk for v in row])
            seqs.update((str(r[0]), int(r[1])) for r in found)
    else:
        c.executemany(f"{insert}({dialect.marks(6)})", rows)
        # One writer holds the lock and seq is AUTOINCREMENT: the rows just inserted took the
        # consecutive seqs ending at last_insert_rowid(), in insertion order.
        last = c.execute("SELECT last_insert_rowid()").fetchone()[0]
        seqs = {event_id: last - len(new) + 1 + i for i, event_id in enumerate(new)}
    c.executemany(
        "INSERT INTO deliveries (event_seq, sink, resource, status, next_attempt_at, created_at) "
        "VALUES (?, ?, ?, 'pending', ?, ?)",
        [(seqs[e.id], sink, e.resource, now, now) for e, sinks in new.values() for sink in sinks],
    )
    return [e for e, _ in new.values()]


def _enqueue_in_sets(c: Tx, events: list[tuple[Event, Sequence[str]]], now: float) -> Callable[[], list[Event]]:
    """`enqueue` as one statement (PostgreSQL): the events inserted in the order given, skipping those
    stored before (an id names its resource: watcher.events.event_id), and a delivery per sink for
    each inserted one, made from the rows the insert returns; the new ids come back with the commit."""
    new: dict[str, tuple[Event, Sequence[str]]] = {}
    for event, sinks in events:
        new.setdefault(event.id, (event, sinks))
    if not new:
        return list
    owed = [(e.id, sink) for e, sinks in new.values() for sink in sinks]
    found = c.execute(
        "WITH new AS ("
        " INSERT INTO events (id, type, resource, campaign_id, payload, detected_at)"
        " SELECT u.id, u.type, u.resource, u.campaign_id, u.payload, ?"
        " FROM unnest(?::text[], ?::text[], ?::text[], ?::bigint[], ?::text[]) WITH ORDINALITY"
        " AS u(id, type, resource, campaign_id, payload, n) ORDER BY u.n"
        " ON CONFLICT (resource, id) DO NOTHING RETURNING id, seq, resource),"
        " owed AS ("
        " INSERT INTO deliveries (event_seq, sink, resource, status, next_attempt_at, created_at)"
        " SELECT new.seq, w.sink, new.resource, 'pending', ?, ?"
        " FROM new JOIN unnest(?::text[], ?::text[]) AS w(id, sink) ON w.id = new.id)"
        " SELECT id FROM new",
        [
            now,
            [e.id for e, _ in new.values()],
            [e.type for e, _ in new.values()],
            [e.resource for e, _ in new.values()],
            [e.campaign_id for e, _ in new.values()],
            [dumps(e.envelope()) for e, _ in new.values()],
            now,
            now,
            [event_id for event_id, _ in owed],
            [sink for _, sink in owed],
        ],
    )

    def fresh() -> list[Event]:
        inserted = {str(row[0]) for row in found}
        return [e for event_id, (e, _) in new.items() if event_id in inserted]

    return fresh


def _record_in_sets(c: Tx, attempts: Sequence[Recorded]) -> None:
    """`record_attempts`' two writes as one statement each, the rows bound as arrays (PostgreSQL).

    Two outcomes for one delivery in a batch leave what running them in order would: the later
    one's values, and the time of a delivery among them. An array holds one type: numbers are
    made floats or ints here, as its column takes them.
    """
    final: dict[tuple[str, int], tuple[Any, ...]] = {}
    for a in attempts:
        for o in a.outcomes:
            earlier = final.get((a.sink, o.seq))
            delivered_at = float(a.now) if o.status == "delivered" else (earlier[6] if earlier else None)
            final[(a.sink, o.seq)] = (
                *(a.sink, int(o.seq), o.status, int(o.attempts), float(o.next_attempt_at), o.error),
                *(delivered_at, int(o.asked_to_wait)),
            )
    if not final:
        return
    c.execute(
        "UPDATE deliveries d SET status = u.status, attempts = u.attempts, next_attempt_at = u.next_at, "
        "last_error = u.error, asked_to_wait = u.asked, delivered_at = coalesce(u.delivered_at, d.delivered_at) "
        "FROM unnest(?::text[], ?::bigint[], ?::text[], ?::integer[], ?::float8[], ?::text[], ?::float8[], "
        "?::integer[]) AS u(sink, seq, status, attempts, next_at, error, delivered_at, asked) "
        "WHERE d.sink = u.sink AND d.event_seq = u.seq",
        [list(column) for column in zip(*final.values(), strict=True)],
    )
    logged = [
        (
            *(a.sink, o.event_id, int(o.logged_attempt), a.status_code, float(a.duration), o.error, float(a.now)),
            *(o.excerpt, o.resource, int(o.seq)),
        )
        for a in attempts
        for o in a.outcomes
    ]
    # In the outcomes' order (the log's ids), and not for a delivery gone meanwhile (`forget`
    # erased the lead while it was in flight).
    c.execute(
        "INSERT INTO attempts (sink, event_id, attempt, status_code, duration, error, at, excerpt, resource) "
        "SELECT u.sink, u.event_id, u.attempt, u.status_code, u.duration, u.error, u.at, u.excerpt, "
        "coalesce(u.resource, e.resource) "
        "FROM unnest(?::text[], ?::text[], ?::integer[], ?::integer[], ?::float8[], ?::text[], ?::float8[], "
        "?::text[], ?::text[], ?::bigint[]) WITH ORDINALITY "
        "AS u(sink, event_id, attempt, status_code, duration, error, at, excerpt, resource, seq, n) "
        "JOIN deliveries d ON d.sink = u.sink AND d.event_seq = u.seq LEFT JOIN events e ON e.seq = u.seq "
        "ORDER BY u.n",
        [list(column) for column in zip(*logged, strict=True)],
    )


class Outbox(Connection):
    """Reading what is due, and writing what attempts did to it."""

    def due(
        self,
        sink: str,
        now: float,
        limit: int,
        busy: frozenset[int] = frozenset(),
        *,
        after: int = 0,
        passing: float | None = None,
    ) -> list[Due]:
        """Pending deliveries of `sink` that are due, in seq order, at most one per resource.

        A delivery waits while an earlier one about the same resource is still pending, so each
        receiver sees a lead's or a campaign's events in the order they were detected. `after`
        resumes a reader where its last read ended (a read costs the rows it returns, not the
        queue before them); `passing` is when a `once` pass began, leaving out what it has
        already attempted (see `_due_where`).
        """
        where, params = _due_where(sink, now, passing)
        # The busy rows (sent, their outcomes not yet committed: a few hundred at most) are left out
        # by the query, so their payloads are never read; a huge set (a digest) is filtered here.
        skip = sorted(busy) if len(busy) <= BUSY_IN_QUERY else []
        marks = f"AND d.event_seq NOT IN ({self.dialect.marks(len(skip))})" if skip else ""
        rows = self._rows(
            f"""
            SELECT d.event_seq AS seq, d.sink, e.id AS event_id, e.type, d.resource, e.campaign_id,
                   e.payload, d.attempts, d.created_at
            FROM deliveries d {self.dialect.indexed_by("deliveries_pending")} JOIN events e ON e.seq = d.event_seq
            WHERE {where} AND d.event_seq > ? {marks}
              AND NOT EXISTS (
                SELECT 1 FROM deliveries p
                WHERE p.sink = d.sink AND p.resource = d.resource AND p.status = 'pending'
                  AND p.event_seq < d.event_seq)
            ORDER BY d.event_seq
            LIMIT ?
            """,
            (*params, after, *skip, limit + (0 if skip else len(busy))),
        )
        if skip:
            return [Due(**dict(r)) for r in rows]
        return [Due(**dict(r)) for r in rows if r["seq"] not in busy][:limit]

    def next_due_at(self, sink: str, busy: frozenset[int] = frozenset()) -> float | None:
        """When the next delivery `due` could return falls due (None: nothing pending outside `busy`).

        Only the first pending delivery of each resource counts: a later one may be scheduled
        earlier, but it cannot go before the one ahead of it.
        """
        skip = f"AND d.event_seq NOT IN ({self.dialect.marks(len(busy))})" if busy else ""
        row = self._rows(
            f"""
            SELECT min(d.next_attempt_at) FROM deliveries d
            WHERE d.sink = ? AND d.status = 'pending' {skip}
              AND NOT EXISTS (
                SELECT 1 FROM deliveries p
                WHERE p.sink = d.sink AND p.resource = d.resource AND p.status = 'pending'
                  AND p.event_seq < d.event_seq)
            """,
            (sink, *sorted(busy)),
        )[0]
        return float(row[0]) if row[0] is not None else None

    def record_outcomes(
        self,
        sink: str,
        outcomes: Sequence[Outcome],
        *,
        now: float,
        status_code: int | None,
        duration: float,
        success: bool,
    ) -> None:
        """Write what one attempt did to its deliveries, the attempt log and the sink's health, together."""
        self.record_attempts([Recorded(sink, tuple(outcomes), now, status_code, duration, success)])

    def record_attempts(self, attempts: Sequence[Recorded]) -> None:
        """Write what several attempts did, in one transaction (all of it or none).

        Committed without waiting for the disk (synchronous NORMAL, safe in WAL against a crash of
        the daemon): a power cut can only forget that something was delivered, and the event then
        goes again under the same webhook-id, which at-least-once delivery allows. Poll commits,
        which move the cursor, keep FULL, and each of them makes everything before it durable too.
        """
        with self._relaxed(), self.transaction() as c:
            if self.dialect.arrays:
                _record_in_sets(c, attempts)
                note_health(c, attempts)
                return
            c.executemany(
                "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?, "
                "asked_to_wait = ?, delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END "
                "WHERE sink = ? AND event_seq = ?",
                [
                    (
                        o.status,
                        o.attempts,
                        o.next_attempt_at,
                        o.error,
                        int(o.asked_to_wait),
                        o.status,
                        a.now,
                        a.sink,
                        o.seq,
                    )
                    for a in attempts
                    for o in a.outcomes
                ],
            )
            c.executemany(
                # Not for a delivery gone meanwhile (`forget` erased the lead while it was in flight).
                "INSERT INTO attempts (sink, event_id, attempt, status_code, duration, error, at, excerpt, "
                "resource) SELECT ?, ?, ?, ?, ?, ?, ?, ?, coalesce(?, (SELECT resource FROM events WHERE seq = ?)) "
                "WHERE EXISTS (SELECT 1 FROM deliveries WHERE sink = ? AND event_seq = ?)",
                [
                    (
                        *(a.sink, o.event_id, o.logged_attempt, a.status_code, a.duration, o.error, a.now, o.excerpt),
                        *(o.resource, o.seq, a.sink, o.seq),
                    )
                    for a in attempts
                    for o in a.outcomes
                ],
            )
            note_health(c, attempts)

    def reschedule(self, sink: str, schedule: Sequence[float], jitter: float = 0.2) -> int:
        """Re-time the sink's waiting retries on `schedule`, from each one's last attempt; returns how many moved.

        A retry keeps its stored time while that lies within the schedule's jitter of its step, so an
        unchanged schedule moves nothing; a shortened (or lengthened) one applies at once.
        """
        if not schedule:
            return 0
        last = {
            r[0]: float(r[1])
            for r in self._rows("SELECT event_id, max(at) FROM attempts WHERE sink = ? GROUP BY event_id", (sink,))
        }
        rows = self._rows(
            "SELECT d.event_seq, e.id, d.attempts, d.next_attempt_at, d.asked_to_wait FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq WHERE d.sink = ? AND d.status = 'pending' AND d.attempts > 0",
            (sink,),
        )
        changes: list[tuple[float, str, int]] = []
        for seq, event_id, attempts, at, asked in rows:
            if event_id not in last:
                continue
            when = last[event_id]
            step = float(schedule[min(int(attempts), len(schedule)) - 1])
            if asked and at > when + step:
                continue  # the receiver asked for this wait (Retry-After): no schedule shortens it
            if not when + step * (1 - jitter) - 1e-6 <= at <= when + step * (1 + jitter) + 1e-6:
                changes.append((when + step, sink, seq))
        if changes:
            with self.transaction() as c:
                c.executemany("UPDATE deliveries SET next_attempt_at = ? WHERE sink = ? AND event_seq = ?", changes)
        return len(changes)

    def due_digest(
        self,
        sink: str,
        now: float,
        sample: int,
        limit: int,
        busy: frozenset[int] = frozenset(),
        *,
        passing: float | None = None,
    ) -> list[Due]:
        """Every due pending delivery of `sink` (at most `limit`), oldest first, for one digest.

        Unlike `due`, later events of a resource come too when everything before them is due: a
        digest sends them together, in order. Only the first `sample` carry their payload (the
        rest are counted, not shown), so a backlog of thousands stays small in memory.
        """
        where, params = _due_where(sink, now, passing)
        # An earlier pending event of the resource that this read would not take itself (not due,
        # or already tried in this pass) holds every later one back.
        held, held_params = _due_when(now, passing, alias="p")
        rows = self._rows(
            f"""
            SELECT d.event_seq AS seq, d.sink, e.id AS event_id, e.type, d.resource, e.campaign_id,
                   '' AS payload, d.attempts, d.created_at
            FROM deliveries d JOIN events e ON e.seq = d.event_seq
            WHERE {where}
              AND NOT EXISTS (
                SELECT 1 FROM deliveries p
                WHERE p.sink = d.sink AND p.resource = d.resource AND p.status = 'pending'
                  AND p.event_seq < d.event_seq AND NOT ({held}))
            ORDER BY d.event_seq
            LIMIT ?
            """,
            (*params, *held_params, limit + len(busy)),
        )
        # Rows busy elsewhere (in flight, or kept for a write) hold the rest of their resource back too.
        due: list[Due] = []
        blocked: set[str] = set()
        for r in rows:
            if r["seq"] in busy or r["resource"] in blocked:
                blocked.add(r["resource"])
                continue
            due.append(Due(**dict(r)))
        due = due[:limit]
        head = [d.seq for d in due[:sample]]
        if head:
            payloads: dict[int, str] = {
                int(r[0]): str(r[1])
                for r in self._rows(
                    f"SELECT seq, payload FROM events WHERE seq IN ({self.dialect.marks(len(head))})", head
                )
            }
            due[: len(head)] = [replace(d, payload=payloads[d.seq]) for d in due[: len(head)]]
        return due

    def due_count(self, sink: str, now: float, *, passing: float | None = None) -> int:
        """How many pending deliveries of `sink` are due (a paced sink's burst test)."""
        where, params = _due_where(sink, now, passing)
        return int(self._rows(f"SELECT count(*) FROM deliveries d WHERE {where}", params)[0][0])
