"""The SQLite state file: cursors, lead snapshots, campaign statuses, the outbox and its attempt log.

This is the only module that holds SQL. Every state change is one `BEGIN IMMEDIATE` transaction,
and none of them awaits anything, so a cancelled task can never leave half a change behind.

The outbox is two tables: `events` (one row per detected change, its id unique, the body sent)
and `deliveries` (one row per event and matching sink: status, attempts, next attempt time, last
error, created and delivered times). Storing the body once keeps the file small with many sinks.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher.errors import StateDamaged, StateError, StateTooNew
from watcher.events import Event, dumps, loads
from watcher.records import FORGOTTEN, CampaignState, LeadState, PageCommit, Unreadable

if TYPE_CHECKING:
    import sqlite_utils

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
ASKED_TO_WAIT = "receiver asked to wait"  # marks an attempt whose answer carried a Retry-After
# Busy deliveries up to this many are left out by a due read's query (well below SQLite's limit of
# bound parameters); more are read and dropped in Python.
BUSY_IN_QUERY = 2000

# Each entry moves the schema one version forward; PRAGMA user_version records how far a file has come.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE cursors (
        stream TEXT PRIMARY KEY,
        cursor TEXT,                 -- the newest timestamp exactly as the API wrote it
        cursor_ts REAL,              -- the same instant in Unix seconds (lag metrics)
        walk_from TEXT,              -- filter bound of a walk in progress: a crash resumes from here
        baseline_until REAL,         -- during a first walk: the baseline is leads created up to here (campaigns: ids)
        last_poll_at REAL,
        last_success_at REAL,
        last_error TEXT,
        polls INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE leads (
        id INTEGER PRIMARY KEY,
        created_ts REAL NOT NULL,
        version TEXT,                -- updatedTs of the snapshot
        snapshot TEXT NOT NULL,      -- tracked fields only, compact JSON
        changed_at REAL NOT NULL     -- when the snapshot last changed: pruning age
    );
    CREATE INDEX leads_changed ON leads(changed_at);
    CREATE TABLE campaigns (
        id INTEGER PRIMARY KEY,
        status TEXT NOT NULL,
        transitions INTEGER NOT NULL DEFAULT 0,
        seen_at REAL NOT NULL
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        type TEXT NOT NULL,
        resource TEXT NOT NULL,
        campaign_id INTEGER,
        payload TEXT NOT NULL,       -- {"type", "timestamp", "data"} as detected, before per-sink filtering
        detected_at REAL NOT NULL,
        -- Ids are hashes: indexed alone, every insert would land on a random page. Led by the
        -- resource (lead ids grow with time), a backfill appends instead.
        UNIQUE (resource, id)
    );
    CREATE TABLE deliveries (
        event_seq INTEGER NOT NULL REFERENCES events(seq) ON DELETE CASCADE,
        sink TEXT NOT NULL,
        resource TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        delivered_at REAL,
        PRIMARY KEY (sink, event_seq)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_due ON deliveries(sink, status, next_attempt_at);
    CREATE INDEX deliveries_resource ON deliveries(sink, resource, status, event_seq);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        sink TEXT NOT NULL,
        event_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        status_code INTEGER,
        duration REAL NOT NULL,
        error TEXT,
        at REAL NOT NULL
    );
    CREATE INDEX attempts_at ON attempts(at);
    CREATE TABLE sinks (
        name TEXT PRIMARY KEY,
        fingerprint TEXT,
        disabled_at REAL,
        disabled_reason TEXT,
        failing_since REAL,
        last_success_at REAL,
        last_failure_at REAL
    );
    """,
    # 2: campaign names, so messages about a lead can name its campaign (a lead carries only its IRI)
    """
    ALTER TABLE campaigns ADD COLUMN name TEXT;
    """,
    # 3: event ids chained on the change before them (not on counters a fresh file restarts), the
    # track list each snapshot was taken under, the created walk's permanent baseline floor, the
    # snapshot baseline's progress, and leads the server cannot serialise.
    """
    ALTER TABLE leads ADD COLUMN track TEXT;
    ALTER TABLE leads ADD COLUMN last_event TEXT;
    ALTER TABLE campaigns ADD COLUMN last_event TEXT;
    ALTER TABLE cursors ADD COLUMN floor REAL;
    ALTER TABLE cursors ADD COLUMN progress INTEGER;
    ALTER TABLE cursors ADD COLUMN resume_after INTEGER; -- a resumable walk's last id: it re-reads until it overlaps
    CREATE TABLE tracks (
        signature TEXT PRIMARY KEY,
        track TEXT NOT NULL          -- the JSON list of tracked fields
    );
    CREATE TABLE unreadable (
        stream TEXT NOT NULL,
        lead_id INTEGER NOT NULL,
        first_seen REAL NOT NULL,
        last_tried REAL NOT NULL,
        next_try REAL NOT NULL,
        tries INTEGER NOT NULL DEFAULT 1,
        error TEXT,
        emit_after REAL,             -- created: announced once readable only if created after this
        PRIMARY KEY (stream, lead_id)
    );
    """,
    # 4: what the receiver answered, kept with each attempt (URL redacted, scrubbed, cut short), so
    # `events --attempts` can show an operator why a delivery failed before a replay.
    """
    ALTER TABLE attempts ADD COLUMN excerpt TEXT;
    """,
    # 5: attempts name their resource, so erasing a lead finds its attempt log after its events are
    # pruned (the attempt log outlives delivered events by default).
    """
    ALTER TABLE attempts ADD COLUMN resource TEXT;
    UPDATE attempts SET resource = (SELECT e.resource FROM events e WHERE e.id = attempts.event_id);
    CREATE INDEX attempts_resource ON attempts(resource);
    """,
    # 6: the dispatcher reads pending deliveries in seq order from where its last read ended; the
    # due index (ordered by time) made every read sort all due rows, a cost growing with the queue.
    """
    CREATE INDEX deliveries_pending ON deliveries(sink, event_seq, next_attempt_at, attempts) WHERE status = 'pending';
    """,
)


@dataclass(frozen=True)
class Cursor:
    stream: str
    cursor: str | None
    cursor_ts: float | None
    walk_from: str | None
    baseline_until: float | None
    last_poll_at: float | None
    last_success_at: float | None
    last_error: str | None
    polls: int
    floor: float | None = None  # created stream: leads created before this are the baseline, never announced
    progress: int | None = None  # pages a resumable walk has committed
    resume_after: int | None = None  # the last id a resumable walk committed


@dataclass(frozen=True)
class Due:
    """A pending delivery whose time has come."""

    seq: int
    sink: str
    event_id: str
    type: str
    resource: str
    campaign_id: int | None
    payload: str
    attempts: int
    created_at: float

    def event(self) -> Event:
        body = loads(self.payload)
        return Event(
            id=self.event_id,
            type=self.type,
            timestamp=body["timestamp"],
            data=body["data"],
            resource=self.resource,
            campaign_id=self.campaign_id,
        )


@dataclass(frozen=True)
class SinkState:
    name: str
    disabled_at: float | None
    disabled_reason: str | None
    failing_since: float | None
    last_success_at: float | None
    pending: int
    dead: int
    delivered: int
    oldest_pending_at: float | None

    def stranded(self, configured: Iterable[str]) -> bool:
        """A sink the configuration no longer names still holds events nothing will send."""
        return self.name not in set(configured) and self.pending + self.dead > 0


@dataclass(frozen=True)
class Outcome:
    """What one attempt did to one delivery; decided by the outbox, written here."""

    seq: int
    event_id: str
    status: str  # pending / delivered / dead
    attempts: int  # the delivery's attempt count from now on (what the schedule counts)
    next_attempt_at: float
    error: str | None
    attempt: int | None = None  # this attempt's number in the attempt log, when it differs from `attempts`
    excerpt: str | None = None  # the start of the receiver's answer to this attempt, for the attempt log
    resource: str | None = None  # the event's resource, for the attempt log (looked up when not given)

    @property
    def logged_attempt(self) -> int:
        return self.attempt if self.attempt is not None else self.attempts


@dataclass(frozen=True)
class Recorded:
    """One attempt's outcomes with what the attempt log and the sink's health keep of it."""

    sink: str
    outcomes: tuple[Outcome, ...]
    now: float
    status_code: int | None
    duration: float
    success: bool


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a read-then-write transaction
    # can never fail half-way with SQLITE_BUSY_SNAPSHOT.
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a committed cursor must never outlive its outbox rows, not even after a power cut.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


# SQLite's answers that mean the bytes on disk are wrong, not that the disk is busy or full.
_DAMAGED = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
_DAMAGE_HELP = (
    "stop the daemon, keep a copy, then recover or restore it (docs/operations.md: the state file is damaged)"
)


def state_error(exc: sqlite3.Error, path: Path, doing: str) -> StateError:
    """The error to raise for an SQLite failure on the state file: damaged, read-only, or passing."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(tuple(_DAMAGED)):
        return StateDamaged(f"state file {path} is damaged ({exc}): {_DAMAGE_HELP}")
    if name.startswith("SQLITE_READONLY"):
        error = StateError(
            f"cannot {doing} state file {path}: it is read-only (the file's mode or owner, its folder's, "
            "or a read-only mount); it needs to be writable by the daemon's user"
        )
        error.read_only = True
        return error
    return StateError(f"cannot {doing} state file {path}: {exc}")


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection that has read the file's header (mode=ro: SQLite refuses every write).

    A WAL-mode file needs its -shm to be read, which a read-only folder cannot give it. Without a
    -wal (the daemon stopped cleanly) the main file is the whole state, and it is read as immutable.
    """
    uri = f"{path.absolute().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA user_version").fetchone()
        return conn
    except sqlite3.Error as exc:
        error = exc
    wal = path.with_name(path.name + "-wal")
    if os.access(path.parent, os.W_OK) and not _read_only_mount(path.parent):
        raise state_error(error, path, "read")
    if wal.exists() and wal.stat().st_size > 0:
        raise StateError(
            f"cannot read state file {path}: its folder is read-only and its -wal holds changes that SQLite "
            "can only read with a -shm beside it; make the folder writable, or read a copy made with .backup"
        )
    try:
        conn = sqlite3.connect(f"{uri}&immutable=1", uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA user_version").fetchone()
        return conn
    except sqlite3.Error as exc:
        raise state_error(exc, path, "read") from None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _private(path: Path) -> None:
    """Create the state file 0600, and take group and other access away from one that has it.

    The file holds lead payloads with personal data. SQLite gives its -wal and -shm the main
    file's mode, so a main file created 0600 (not left to the umask) keeps all three private.
    """
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with suppress(FileNotFoundError):
                if file.stat().st_mode & 0o077:
                    os.chmod(file, 0o600)
    except OSError as exc:
        error = StateError(f"cannot open state file {path}: {exc.strerror or exc}")
        # Permissions or a read-only mount: the daemon waits for it to be writable, not for space.
        error.read_only = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        raise error from None


def _where(tests: Sequence[tuple[str, Any]]) -> tuple[str, list[Any]]:
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
            parts.append(f"{test} ({','.join('?' * len(value))})")
            params += list(value)
        else:
            parts.append(f"{test} ?")
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
    c: sqlite3.Connection, assignments: str, values: Sequence[Any], tests: Sequence[tuple[str, Any]]
) -> int:
    """Apply `assignments` to the deliveries `tests` pick (alias `d`, joined to their event `e`)."""
    where, params = _where(tests)
    return c.execute(
        f"UPDATE deliveries SET {assignments} WHERE (sink, event_seq) IN "
        f"(SELECT d.sink, d.event_seq FROM deliveries d JOIN events e ON e.seq = d.event_seq{where})",
        [*values, *params],
    ).rowcount


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


class Store:
    """The state file. Open with `Store.open`; close with `close()`."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._identity = _identity(path)
        self._wal: tuple[int, int] | None = None  # set by `open`: a read-only store writes none

    @cached_property
    def db(self) -> sqlite_utils.Database:
        """sqlite-utils over the same connection, for the operators' read side (`events`); imported
        on first use, since the daemon's hot path never needs it and it costs start-up time."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    @classmethod
    def open(cls, path: Path) -> Store:
        if not path.parent.is_dir():
            raise StateError(f"state directory {path.parent} does not exist")
        _private(path)
        try:
            store = cls(_connect(path), path)
            store._migrate()
        except sqlite3.Error as exc:
            raise state_error(exc, path, "open") from None
        # The -wal this connection writes (SQLite made it when the migration read the file).
        store._wal = _identity(path.with_name(path.name + "-wal"))
        return store

    @classmethod
    def open_readonly(cls, path: Path) -> Store:
        """The state file for reading only (`status`): never created, migrated or written.

        A file at another schema version is refused rather than migrated: between an upgrade and
        the restart, the old daemon still owns the file, and only the daemon migrates it.
        """
        if not path.is_file():
            raise StateError(f"no state file at {path}")
        conn = _connect_readonly(path)
        try:
            conn.execute("PRAGMA query_only = ON")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.Error as exc:
            conn.close()
            raise state_error(exc, path, "read") from None
        known = len(MIGRATIONS)
        if version != known:
            conn.close()
            if version > known:
                raise StateTooNew(
                    f"state file {path} needs a newer convertr-watcher (schema version {version}; "
                    f"this release reads version {known})",
                    needs=version,
                    knows=known,
                )
            raise StateError(
                f"state file {path} is at schema version {version}, older than this release ({known}): "
                "restart the daemon to migrate it (status never writes)"
            )
        return cls(conn, path)

    @staticmethod
    def history(path: Path) -> int:
        """How many streams the file holds a cursor for, read-only: 0 for a file that is new, empty or
        has lost what it held. StateDamaged when SQLite cannot read it."""
        if not path.is_file() or path.stat().st_size == 0:
            return 0
        conn = _connect_readonly(path)
        try:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cursors'").fetchone():
                return 0
            return int(conn.execute("SELECT count(*) FROM cursors").fetchone()[0])
        except sqlite3.Error as exc:
            raise state_error(exc, path, "read") from None
        finally:
            conn.close()

    def verify(self, *, quick: bool = False) -> None:
        """SQLite's own check of every page (quick: without matching indexes to their tables);
        StateDamaged naming the first problems it finds."""
        rows = self._rows("PRAGMA quick_check" if quick else "PRAGMA integrity_check")
        problems = [str(r[0]) for r in rows]
        if problems != ["ok"]:
            shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            raise StateDamaged(f"state file {self.path} is damaged ({shown}): {_DAMAGE_HELP}")

    def close(self) -> None:
        if not self.replaced():
            self.conn.close()
            return
        # SQLite leaves the -wal of a file that was moved or deleted in place when it closes, and the
        # next open would apply it to whatever file has this name now (a restored backup): fold it
        # into the file it belongs to and empty it; where that cannot finish (a reader holds it, the
        # disk is full), move it aside, so that it never meets the new file.
        folded = False
        with suppress(sqlite3.Error):
            busy, _frames, _copied = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            folded = busy == 0
        self.conn.close()
        wal = self.path.with_name(self.path.name + "-wal")
        if not folded and self._wal is not None and _identity(wal) == self._wal:
            with suppress(OSError):
                os.replace(wal, wal.with_name(wal.name + ".orphaned"))

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def replaced(self) -> bool:
        """Whether the path now names another file than the one opened (moved over, or deleted)."""
        return _identity(self.path) != self._identity

    def outside_writes(self) -> int:
        """A number that changes whenever another connection commits to the file (PRAGMA data_version)."""
        return int(self._rows("PRAGMA data_version")[0][0])

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StateTooNew(
                f"state file {self.path} has schema version {version}, newer than this release knows "
                f"({len(MIGRATIONS)}): upgrade convertr-watcher or restore a matching backup",
                needs=version,
                knows=len(MIGRATIONS),
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction():
                for statement in script.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "write") from None
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise state_error(exc, self.path, "write") from None
        except BaseException:
            self._rollback()
            raise

    @contextmanager
    def _relaxed(self) -> Iterator[None]:
        try:
            self.conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "write") from None
        try:
            yield
        finally:
            with suppress(sqlite3.Error):
                self.conn.execute("PRAGMA synchronous = FULL")

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            cur = self.conn.execute(sql, params)
            cur.row_factory = sqlite3.Row
            # Rows after the first are read here: a damaged page deep in the result fails here too.
            return cur.fetchall()
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "read") from None

    # --- cursors -----------------------------------------------------------------------------

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

    # --- leads and campaigns ------------------------------------------------------------------

    def leads(self, ids: Iterable[int]) -> dict[int, LeadState]:
        wanted = list(ids)
        found: dict[int, LeadState] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
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
            c.execute("INSERT OR IGNORE INTO tracks (signature, track) VALUES (?, ?)", (signature, dumps(list(track))))

    def reset_stream(self, stream: str) -> None:
        """Forget a stream's cursor row: its next walk starts as a first one."""
        with self.transaction() as c:
            c.execute("DELETE FROM cursors WHERE stream = ?", (stream,))

    def campaign_names(self) -> dict[int, str]:
        return {r["id"]: r["name"] for r in self._rows("SELECT id, name FROM campaigns WHERE name IS NOT NULL")}

    def lead_count(self) -> int:
        return int(self._rows("SELECT count(*) FROM leads")[0][0])

    # --- the one write path of a poll ---------------------------------------------------------

    def commit_page(self, page: PageCommit) -> list[Event]:
        """Write a page's state, outbox rows and cursor in one transaction; return the events that were new."""
        fresh: list[Event] = []
        with self.transaction() as c:
            if page.leads:
                c.executemany(
                    "INSERT INTO leads (id, created_ts, version, snapshot, changed_at, track, last_event) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET created_ts = excluded.created_ts, version = excluded.version, "
                    "snapshot = excluded.snapshot, changed_at = excluded.changed_at, track = excluded.track, "
                    "last_event = excluded.last_event "
                    f"WHERE leads.track IS NOT '{FORGOTTEN}'",  # a forgotten lead stays forgotten
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
                fresh = self._insert_events(c, wanted, page.now)
            c.execute("INSERT OR IGNORE INTO cursors (stream) VALUES (?)", (page.stream,))
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
                    "tries = tries + 1",
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
        return fresh

    def _insert_events(
        self, c: sqlite3.Connection, events: list[tuple[Event, Sequence[str]]], now: float
    ) -> list[Event]:
        """Insert events not stored before, with a pending delivery per sink; return the new ones.

        An event id already present means the same change was committed before (an overlap
        re-read, a restart): its deliveries exist, so nothing is added for it.
        """
        resources = sorted({e.resource for e, _ in events})
        ids = [e.id for e, _ in events]
        # Two IN lists (not a row-value IN, which SQLite answers with a full scan) so the
        # (resource, id) index is searched; the ids alone decide what is known.
        known = {
            row[0]
            for row in c.execute(
                f"SELECT id FROM events WHERE resource IN ({','.join('?' * len(resources))}) "
                f"AND id IN ({','.join('?' * len(ids))})",
                [*resources, *ids],
            )
        }
        new: dict[str, tuple[Event, Sequence[str]]] = {}
        for event, sinks in events:
            if event.id not in known:
                new.setdefault(event.id, (event, sinks))
        if not new:
            return []
        c.executemany(
            "INSERT INTO events (id, type, resource, campaign_id, payload, detected_at) VALUES (?, ?, ?, ?, ?, ?)",
            [(e.id, e.type, e.resource, e.campaign_id, dumps(e.envelope()), now) for e, _ in new.values()],
        )
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

    # --- delivery -----------------------------------------------------------------------------

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
        marks = f"AND d.event_seq NOT IN ({','.join('?' * len(skip))})" if skip else ""
        rows = self._rows(
            f"""
            SELECT d.event_seq AS seq, d.sink, e.id AS event_id, e.type, d.resource, e.campaign_id,
                   e.payload, d.attempts, d.created_at
            FROM deliveries d INDEXED BY deliveries_pending JOIN events e ON e.seq = d.event_seq
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
        marks = ",".join("?" * len(busy))
        skip = f"AND d.event_seq NOT IN ({marks})" if busy else ""
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
            c.executemany(
                "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?, "
                "delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END "
                "WHERE sink = ? AND event_seq = ?",
                [
                    (o.status, o.attempts, o.next_attempt_at, o.error, o.status, a.now, a.sink, o.seq)
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
            c.executemany("INSERT OR IGNORE INTO sinks (name) VALUES (?)", [(a.sink,) for a in attempts])
            for a in attempts:
                if a.success:
                    c.execute(
                        "UPDATE sinks SET last_success_at = ?, failing_since = NULL WHERE name = ?", (a.now, a.sink)
                    )
                else:
                    c.execute(
                        "UPDATE sinks SET last_failure_at = ?, failing_since = coalesce(failing_since, ?) "
                        "WHERE name = ?",
                        (a.now, a.now, a.sink),
                    )

    def disable_sink(self, sink: str, now: float, reason: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO sinks (name) VALUES (?)", (sink,))
            c.execute("UPDATE sinks SET disabled_at = ?, disabled_reason = ? WHERE name = ?", (now, reason, sink))

    def sync_sink(self, sink: str, fingerprint: str) -> bool:
        """Record a sink's configuration; a changed one is re-enabled. Returns whether it is disabled."""
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO sinks (name, fingerprint) VALUES (?, ?)", (sink, fingerprint))
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
        marks = ",".join("?" * len(wanted))
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
            f"SELECT sink, status, count(*) AS n FROM deliveries WHERE 1 {only_sinks} GROUP BY sink, status", params
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

    def replay(self, now: float, chosen: Selection, statuses: Sequence[str] = (DEAD,)) -> int:
        """Re-queue the chosen dead or delivered deliveries; they keep their event id. Returns how many."""
        with self.transaction() as c:
            # A replayed delivery starts a fresh schedule: its age for max_age counts from now.
            count = _update_chosen(
                c,
                "status = 'pending', attempts = 0, next_attempt_at = ?, created_at = ?, delivered_at = NULL",
                [now, now],
                [("d.status IN", statuses), *chosen.tests()],
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
                    "UPDATE OR IGNORE deliveries SET sink = ?, next_attempt_at = ?, "
                    "attempts = CASE WHEN status = 'dead' THEN 0 ELSE attempts END, "
                    "created_at = CASE WHEN status = 'dead' THEN ? ELSE created_at END, status = 'pending' "
                    "WHERE sink = ? AND event_seq = ? AND status IN ('pending', 'dead')",
                    (new, now, now, old, seq),
                ).rowcount
        return moved, len(rows) - moved

    def reschedule(self, sink: str, schedule: Sequence[float], jitter: float = 0.2) -> int:
        """Re-time the sink's waiting retries on `schedule`, from each one's last attempt; returns how many moved.

        A retry keeps its stored time while that lies within the schedule's jitter of its step, so an
        unchanged schedule moves nothing; a shortened (or lengthened) one applies at once.
        """
        if not schedule:
            return 0
        # SQLite gives the bare columns of the row holding max(at): the last attempt's error.
        last = {
            r[0]: (float(r[1]), ASKED_TO_WAIT in (r[2] or ""))
            for r in self._rows(
                "SELECT event_id, max(at), error FROM attempts WHERE sink = ? GROUP BY event_id", (sink,)
            )
        }
        rows = self._rows(
            "SELECT d.event_seq, e.id, d.attempts, d.next_attempt_at FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq WHERE d.sink = ? AND d.status = 'pending' AND d.attempts > 0",
            (sink,),
        )
        changes: list[tuple[float, str, int]] = []
        for seq, event_id, attempts, at in rows:
            if event_id not in last:
                continue
            when, asked = last[event_id]
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
                for r in self._rows(f"SELECT seq, payload FROM events WHERE seq IN ({','.join('?' * len(head))})", head)
            }
            due[: len(head)] = [replace(d, payload=payloads[d.seq]) for d in due[: len(head)]]
        return due

    def due_count(self, sink: str, now: float, *, passing: float | None = None) -> int:
        """How many pending deliveries of `sink` are due (a paced sink's burst test)."""
        where, params = _due_where(sink, now, passing)
        return int(self._rows(f"SELECT count(*) FROM deliveries d WHERE {where}", params)[0][0])

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

    # --- the outbox for operators (`events`) ----------------------------------------------------

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
            ]
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
                f"WHERE event_id IN ({','.join('?' * len(chunk))}) ORDER BY id",
                chunk,
            )
        return found

    def _query(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        try:
            return list(self.db.query(sql, params))
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "read") from None

    # --- erasure ------------------------------------------------------------------------------

    def forget(self, lead_id: int, now: float, *, unseen: bool = True) -> dict[str, int] | None:
        """Erase one lead's personal data: its snapshot, its events' payloads and deliveries, its
        attempt log and unreadable record; keep a bare tombstone so the lead is never announced again.

        With `unseen=False` a lead the state holds nothing about is left alone and None comes back:
        a bare tombstone for a mistyped id would silence some other person's lead for good.

        secure_delete zeroes the freed pages, and the WAL is checkpointed and truncated, so the bytes
        leave the file rather than lingering in free pages or old WAL frames.
        """
        resource = f"lead:{lead_id}"
        try:
            self.conn.execute("PRAGMA secure_delete = ON")
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "write") from None
        with self.transaction() as c:
            if not unseen and not self._knows_lead(c, lead_id, resource):
                return None
            ids = [r[0] for r in c.execute("SELECT id FROM events WHERE resource = ?", (resource,))]
            # By resource too: the attempt log outlives delivered events, whose ids are then gone.
            attempts = c.execute("DELETE FROM attempts WHERE resource = ?", (resource,)).rowcount
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
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
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "checkpoint") from None
        return {"events": events, "deliveries": deliveries, "attempts": attempts}

    @staticmethod
    def _knows_lead(c: sqlite3.Connection, lead_id: int, resource: str) -> bool:
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

    # --- housekeeping -------------------------------------------------------------------------

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
            marks = ",".join("?" * len(names))
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
                "DELETE FROM leads WHERE changed_at < ? AND track IS NOT ?", (now - snapshot_retention, FORGOTTEN)
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

    def integrity_check(self) -> str:
        return str(self._rows("PRAGMA integrity_check")[0][0])
