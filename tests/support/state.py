"""Read a state file through the `Store` API, never by SQL, so tests survive a change of schema.

Opened read-only the way `status` and `events` open it (SQLite `mode=ro`, never created or
migrated), so a test may read beside a running daemon without taking part in its transactions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from watcher.errors import StateError
from watcher.state.store import Store

T = TypeVar("T")


@contextmanager
def reading(path: Path) -> Iterator[Store]:
    """The state file opened read-only for the `with` block; fails if it is missing or at another schema."""
    store = Store.open_readonly(path)
    try:
        yield store
    finally:
        store.close()


def peek(path: Path, read: Callable[[Store], T], default: T) -> T:
    """`read(store)` on the file read-only; `default` while there is none readable yet (not created, not
    migrated, or busy past the timeout), so a wait loop can call it before the daemon has written anything."""
    try:
        with reading(path) as store:
            return read(store)
    except StateError:
        return default
