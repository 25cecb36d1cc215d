"""`check --state` on a PostgreSQL state: does it answer, at which schema version, who leads.

Read-only, on a session of its own: nothing is made, migrated or locked, so it is safe beside
running daemons. PostgreSQL checks its own pages (data checksums, when the cluster has them) as
it reads them; what an operator needs from `check` is whether this host reaches the state with
this role, whether this release can use it, and which daemon leads it now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from watcher.errors import StateError, StateTooNew
from watcher.leadership import LeadershipStatus, describe, read_status
from watcher.state.postgres import MIGRATIONS, conninfo_for, schema_version

if TYPE_CHECKING:
    from watcher.config import PostgresState


@dataclass(frozen=True)
class PostgresCheck:
    version: int | None  # None: no state in the schema yet (no daemon has led it)
    knows: int  # the version this release migrates to
    cursors: int  # streams with a cursor
    leadership: LeadershipStatus


def reason(exc: psycopg.Error) -> str:
    """Why a connection or query failed, in one line, never the URL.

    A server's refusal has an SQLSTATE (a wrong password, a missing database, no privilege):
    `describe` says it. A connection that never reached a server has none, and its text is libpq's,
    which names host and port only: its last "failed:" part says why (refused, timed out, no such
    host), where `describe` would leave only the class name."""
    if exc.sqlstate:
        return describe(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    why = first.rsplit("failed: ", 1)[-1].strip()
    return f"cannot connect: {why}" if why else describe(exc)


def check_postgres(state: PostgresState) -> PostgresCheck:
    """The state's version, cursors and leadership; StateError (one line) when it cannot be read,
    StateTooNew when a newer release made it."""
    known = len(MIGRATIONS)
    try:
        with psycopg.connect(conninfo_for(state, None), autocommit=True) as pg:
            pg.execute("SET default_transaction_read_only = on")
            pg.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(state.schema)))
            version = schema_version(pg)
            cursors = 0
            if version is not None and version >= 1:
                found = pg.execute("SELECT count(*) FROM cursors").fetchone()
                cursors = int(found[0]) if found is not None else 0
            leadership = read_status(pg, state.schema, state.timings)
    except psycopg.Error as exc:
        raise StateError(f"cannot check the state in {state.shown()}: {reason(exc)}") from None
    if version is not None and version > known:
        raise StateTooNew(
            f"the state in {state.shown()} has schema version {version}, newer than this release knows "
            f"({known}): upgrade convertr-watcher or restore a matching backup",
            needs=version,
            knows=known,
        )
    return PostgresCheck(version, known, cursors, leadership)
