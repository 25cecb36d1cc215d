"""The connection to the state file and its transactions: the one place that knows the backend.

Every other module of `watcher.state` builds its SQL through `Connection`: `transaction()` for a
write, `_rows`/`_query` for a read, `dialect` for what differs between databases. This class is
the SQLite file; `watcher.state.postgres.PostgresConnection` overrides the same methods for
PostgreSQL, with its own connect, error translation and migrations, and the per-concern modules
run unchanged on either.

Every state change is one `BEGIN IMMEDIATE` transaction, and none of them awaits anything, so a
cancelled task can never leave half a change behind.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from watcher.errors import StateDamaged, StateError

if TYPE_CHECKING:
    import sqlite_utils


@dataclass(frozen=True)
class Dialect:
    """What the SQL of the state layer needs to know about the database it talks to.

    The state layer writes its statements with `?` marks on every backend: PostgreSQL's connection
    turns them into psycopg's `%s` once per statement text (watcher.state.postgres). What cannot be
    written one way for both comes from here.
    """

    name: str
    mark: str  # the bound-parameter placeholder the state layer writes
    distinct: str  # the NULL-safe "not equal" operator
    # Inserted rows' generated keys come back with RETURNING (PostgreSQL's sequences may leave gaps),
    # rather than being counted back from last_insert_rowid() (SQLite's AUTOINCREMENT under one writer).
    returning: bool
    hint_indexes: bool  # SQLite's INDEXED BY: PostgreSQL's planner takes no hints
    # A list binds as one array parameter (PostgreSQL's unnest): a batch of rows is written by one
    # set-based statement, which costs the server a fraction of a statement run per row.
    arrays: bool = False

    def marks(self, count: int) -> str:
        """`count` placeholders, comma-separated (an IN list)."""
        return ",".join([self.mark] * count)

    def indexed_by(self, index: str) -> str:
        """A hint to read a table through `index` (after its alias in FROM), where the database takes one."""
        return f"INDEXED BY {index}" if self.hint_indexes else ""


SQLITE = Dialect("sqlite", "?", distinct="IS NOT", returning=False, hint_indexes=True)
POSTGRESQL = Dialect("postgresql", "?", distinct="IS DISTINCT FROM", returning=True, hint_indexes=False, arrays=True)


class Result(Protocol):
    """What a statement run in a transaction gives back (an sqlite3 or psycopg cursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx(Protocol):
    """An open write transaction, as the state layer's modules write through it."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Result: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Result: ...


def connect(path: Path) -> sqlite3.Connection:
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


def connect_readonly(path: Path) -> sqlite3.Connection:
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


def file_identity(path: Path) -> tuple[int, int] | None:
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


def make_private(path: Path) -> None:
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


class Connection:
    """An open state file: its connection, transactions and reads, shared by every part of the store."""

    dialect: Dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._identity = file_identity(path)
        self._wal: tuple[int, int] | None = None  # set by `open`: a read-only store writes none

    @cached_property
    def db(self) -> sqlite_utils.Database:
        """sqlite-utils over the same connection, for the operators' read side (`events`); imported
        on first use, since the daemon's hot path never needs it and it costs start-up time."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

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
        if not folded and self._wal is not None and file_identity(wal) == self._wal:
            with suppress(OSError):
                os.replace(wal, wal.with_name(wal.name + ".orphaned"))

    def replaced(self) -> bool:
        """Whether the path now names another file than the one opened (moved over, or deleted)."""
        return file_identity(self.path) != self._identity

    def outside_writes(self) -> int:
        """A number that changes whenever another connection commits to the file (PRAGMA data_version)."""
        return int(self._rows("PRAGMA data_version")[0][0])

    def _outbox_grew(self, events: int) -> None:
        """A commit added `events` new events to the outbox (SQLite's planner takes the INDEXED BY
        hints instead of statistics: nothing to do; PostgreSQL may gather them again)."""

    def _prepare_erasure(self) -> None:
        """Before `forget`'s transaction: SQLite zeroes the pages it frees from now on."""
        try:
            self.conn.execute("PRAGMA secure_delete = ON")
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "write") from None

    def _erased(self, tables: Sequence[str]) -> None:
        """After `forget` committed: fold the WAL into the file and truncate it, so the erased bytes
        do not linger in old WAL frames (secure_delete already zeroed the freed pages)."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "checkpoint") from None

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One write transaction: the open connection to write through, committed at the end."""
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
    def snapshot(self) -> Iterator[None]:
        """Reads in the block see one consistent state (one read transaction; WAL lets writers go on)."""
        try:
            self.conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "read") from None
        try:
            yield
        finally:
            self._rollback()

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

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            cur = self.conn.execute(sql, params)
            cur.row_factory = sqlite3.Row
            # Rows after the first are read here: a damaged page deep in the result fails here too.
            return cur.fetchall()
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "read") from None

    def _query(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        try:
            return list(self.db.query(sql, params))
        except sqlite3.Error as exc:
            raise state_error(exc, self.path, "read") from None

    def integrity_check(self) -> str:
        return str(self._rows("PRAGMA integrity_check")[0][0])
