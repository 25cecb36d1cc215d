"""`copy-state`: the whole state copied from one backend to another (SQLite ↔ PostgreSQL).

Every table of the schema is copied row for row with its keys as they are: event seqs, and with
them the order of the outbox and of each resource's events, stay what they were; deliveries keep
their status, attempts, next_attempt_at and asked_to_wait; cursors carry on from where they were.
The source is read in one read transaction (one consistent snapshot); the target is written in one
write transaction, so a failed copy leaves it as empty as it was. A target holding any row is
refused: a copy never merges into a state that has a history of its own.

Generated keys go on from the source's high-water mark, not from the highest row copied: a seq
handed out once (to an event since pruned) is never handed out again, on either side.
"""

from __future__ import annotations

from dataclasses import dataclass

from watcher.errors import StateError
from watcher.state.connection import POSTGRESQL, Connection, Tx

# Every table of the state, parents before children (deliveries reference events).
TABLES: tuple[str, ...] = (
    "cursors",
    "leads",
    "campaigns",
    "tracks",
    "unreadable",
    "events",
    "deliveries",
    "attempts",
    "sinks",
)
# Each table's key, the order rows are read and written in.
_ORDER = {"deliveries": "event_seq, sink", "unreadable": "stream, lead_id", "cursors": "stream", "sinks": "name"}
_ORDER.update({"tracks": "signature", "events": "seq"})
# Keys the database generates (SQLite AUTOINCREMENT / INTEGER PRIMARY KEY, PostgreSQL identities).
IDENTITIES: tuple[tuple[str, str], ...] = (("events", "seq"), ("attempts", "id"))
# Tables that are not the state's data: the schema's version (each side's migrations set it), SQLite's
# own bookkeeping (its AUTOINCREMENT counters are carried as high-water marks), and PostgreSQL's
# leadership (a lease belongs to the daemons of one deployment, never to a copy) and its clock frame
# (one boot's wall-clock offset, watcher.state.pgframe: meaningless to another state).
_NOT_STATE = frozenset(
    {"state_meta", "sqlite_sequence", "sqlite_stat1", "leadership", "leadership_members", "clock_frame"}
)


class TargetNotEmpty(StateError):
    """The copy's target already holds a state; nothing was written."""


@dataclass(frozen=True)
class Copied:
    """How many rows of each table were copied."""

    rows: dict[str, int]


def schema_tables(store: Connection) -> set[str]:
    """The tables the store's schema holds, other than bookkeeping."""
    if store.dialect == POSTGRESQL:
        sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    else:
        sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    return {str(r[0]) for r in store._rows(sql)} - _NOT_STATE


def _high_water(store: Connection, table: str, column: str) -> int:
    """The highest key the table has handed out: its highest row, or its counter when rows were deleted."""
    top = int(store._rows(f"SELECT coalesce(max({column}), 0) FROM {table}")[0][0])
    if store.dialect == POSTGRESQL:
        found = store._rows(f"SELECT pg_sequence_last_value(pg_get_serial_sequence('{table}', '{column}'))")
    else:
        found = store._rows("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)) if _has_counters(store) else []
    counter = int(found[0][0]) if found and found[0][0] is not None else 0
    return max(top, counter)


def _has_counters(store: Connection) -> bool:
    return bool(store._rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'"))


def _set_high_water(c: Tx, target: Connection, table: str, column: str, value: int) -> None:
    if value < 1:
        return
    if target.dialect == POSTGRESQL:
        c.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), ?)", (value,))
    elif table == "events":  # AUTOINCREMENT; attempts' INTEGER PRIMARY KEY goes on from its highest row
        c.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
        c.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, value))


def copy_state(source: Connection, target: Connection) -> Copied:
    """Copy every row of `source` into the empty `target` (both open at this release's schema version).

    TargetNotEmpty when the target holds any row; StateError when either schema has a table this
    copy does not know (a state from another release), before anything is written.
    """
    for store in (source, target):
        unknown = schema_tables(store) - set(TABLES)
        if unknown:
            raise StateError(
                f"the state in {_where(store)} has tables this copy does not know: {', '.join(sorted(unknown))}"
            )
    with source.snapshot():
        rows = {t: source._rows(f"SELECT * FROM {t} ORDER BY {_ORDER.get(t, 'id')}") for t in TABLES}
        marks = {table: _high_water(source, table, column) for table, column in IDENTITIES}
    with target.transaction() as c:
        held = [t for t in TABLES if c.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() is not None]
        if held:
            raise TargetNotEmpty(
                f"the target {_where(target)} already holds a state ({', '.join(held)} not empty): "
                "copy-state writes only into a new, empty state"
            )
        for table in TABLES:
            if rows[table]:
                columns = list(rows[table][0].keys())
                c.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({target.dialect.marks(len(columns))})",
                    [tuple(r) for r in rows[table]],
                )
        for table, column in IDENTITIES:
            _set_high_water(c, target, table, column, marks[table])
    return Copied({t: len(rows[t]) for t in TABLES})


def _where(store: Connection) -> str:
    return str(getattr(store, "where", None) or f"state file {store.path}")
