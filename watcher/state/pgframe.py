"""The wall clock's frame kept in a PostgreSQL state, so a step made while no daemon led is moved too.

On SQLite the frame is a file beside the state (watcher.clockframe). A PostgreSQL state has no file
and is shared by hosts, so the frame is a row in the state's schema: the boot and the wall-clock
offset of the daemon that last led, written by that leader (fenced, like every write of its term)
when its term starts and at each step it notices. At the start of a term, a frame of this same boot
with another offset is a step made while this host was not leading: its retry times and failure
streaks were written in the old frame, and are moved. A frame of another boot (a reboot, or
another host, whose clock wrote the times) tells nothing: it is only written afresh.

The table is made by the first leader that keeps a frame (`CREATE TABLE IF NOT EXISTS`, inside
the fenced transaction), not by a migration: it is bookkeeping of the daemons, like the leadership
tables, and an older release that never reads it loses nothing.
"""

from __future__ import annotations

from watcher.clock import wall_step
from watcher.state.postgres import PostgresConnection

_TABLE = """CREATE TABLE IF NOT EXISTS clock_frame (
    id integer PRIMARY KEY CHECK (id = 1),
    boot text NOT NULL,
    wall_offset double precision NOT NULL,
    kept_at double precision NOT NULL
)"""


def step_while_stopped(store: PostgresConnection, boot: str | None, offset: float) -> float:
    """How far the wall clock stepped since this boot's daemon last kept the frame; 0.0 when unknown."""
    if boot is None:
        return 0.0
    if not store._rows("SELECT to_regclass('clock_frame') IS NOT NULL")[0][0]:
        return 0.0
    found = store._rows("SELECT boot, wall_offset FROM clock_frame WHERE id = 1")
    if not found or found[0][0] != boot:
        return 0.0
    return wall_step(float(found[0][1]), offset)


def keep(store: PostgresConnection, boot: str | None, offset: float, now: float) -> None:
    """Write this leader's frame (StateError for the caller to log; a deposed leader's is refused)."""
    if boot is None:
        return
    with store.transaction() as tx:
        tx.execute(_TABLE)
        tx.execute(
            "INSERT INTO clock_frame (id, boot, wall_offset, kept_at) VALUES (1, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET boot = EXCLUDED.boot, wall_offset = EXCLUDED.wall_offset, "
            "kept_at = EXCLUDED.kept_at",
            (boot, offset, now),
        )
