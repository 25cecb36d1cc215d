"""The state file as one object: `Store` opens it, owns its connection and closes it.

Each concern lives in its own module as a part of `Store`, all of them over the one connection
of `connection.Connection` (transactions, reads, the backend's `Dialect`): `walks` (cursors and
snapshots), `outbox` (the queue), `sinks` (sink health), `admin` (the operator's replay, moves
and listings), `retention` (housekeeping and erasure); `migrations` holds the schema, `records`
the rows they pass around. Callers keep one object (`store.due(...)`, `store.commit_page(...)`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from watcher.errors import StateError, StateTooNew
from watcher.state.admin import Admin
from watcher.state.connection import connect, connect_readonly, file_identity, make_private, state_error
from watcher.state.migrations import MIGRATIONS, migrate
from watcher.state.outbox import Outbox
from watcher.state.retention import Retention
from watcher.state.sinks import Sinks
from watcher.state.walks import Walks

if TYPE_CHECKING:
    from watcher.config import StateConfig
    from watcher.lease import LeaseTimings


class Store(Walks, Outbox, Sinks, Admin, Retention):
    """The state file. Open with `Store.open`; close with `close()`."""

    @classmethod
    def open(cls, path: Path) -> Store:
        if not path.parent.is_dir():
            raise StateError(f"state directory {path.parent} does not exist")
        make_private(path)
        try:
            store = cls(connect(path), path)
            migrate(store)
        except sqlite3.Error as exc:
            raise state_error(exc, path, "open") from None
        # The -wal this connection writes (SQLite made it when the migration read the file).
        store._wal = file_identity(path.with_name(path.name + "-wal"))
        return store

    @classmethod
    def open_readonly(cls, path: Path) -> Store:
        """The state file for reading only (`status`): never created, migrated or written.

        A file at another schema version is refused rather than migrated: between an upgrade and
        the restart, the old daemon still owns the file, and only the daemon migrates it.
        """
        if not path.is_file():
            raise StateError(f"no state file at {path}")
        conn = connect_readonly(path)
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

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(
    state: StateConfig,
    *,
    fence_epoch: Callable[[], int | None] | None = None,
    timings: LeaseTimings | None = None,
    member: str | None = None,
) -> Store:
    """The configured state for writing: the SQLite file (`[state] path`) or PostgreSQL (`[state] url`).

    `fence_epoch` (PostgreSQL only: a leader's store) gives the leadership epoch this process
    leads under, or None when it does not lead; every write transaction checks it inside the
    transaction (watcher.leadership.fence), so a deposed leader commits nothing. `member` (its
    Leadership.member) names its sessions, so a standby taking over can end those it left busy.
    """
    if state.postgres is None:
        return Store.open(state.path)
    from watcher.state.postgres import open_postgres  # psycopg: the [postgres] extra

    return open_postgres(state.postgres, fence_epoch=fence_epoch, timings=timings, member=member)


def open_store_readonly(state: StateConfig) -> Store:
    """The configured state for reading only (`status`, `events`): never created, migrated or written."""
    if state.postgres is None:
        return Store.open_readonly(state.path)
    from watcher.state.postgres import open_postgres_readonly

    return open_postgres_readonly(state.postgres)
