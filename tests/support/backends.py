"""The state on either backend, for the store's own tests: one parametrised fixture, `backend`.

`backend.open()` is a fresh `Store` on an SQLite file in the test's temp folder, or on a PostgreSQL
database of the test's own (tests/support/postgres.py: random name, dropped after). A test opening
several states passes names: a file each on SQLite, a schema each on PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.postgres import Database
from watcher.config import PostgresState, StateConfig
from watcher.state.store import Store, open_store, open_store_readonly


@dataclass(frozen=True)
class Backend:
    """Where a test's states live: `name` is "sqlite" or "postgresql"."""

    name: str
    folder: Path
    db: Database | None = None

    @property
    def postgres(self) -> bool:
        return self.db is not None

    def state(self, name: str = "state.db") -> StateConfig:
        """The [state] section of a state called `name`."""
        if self.db is None:
            return StateConfig(path=self.folder / name)
        schema = "s_" + re.sub(r"[^a-z0-9_]", "_", Path(name).stem.lower())
        server = self.db.server
        pg = PostgresState(url=self.db.url, host=server.host, port=server.port, dbname=self.db.name, schema=schema)
        return StateConfig(path=Path(), postgres=pg)

    def open(self, name: str = "state.db") -> Store:
        return open_store(self.state(name))

    def open_readonly(self, name: str = "state.db") -> Store:
        return open_store_readonly(self.state(name))


def state_of(store: Store) -> StateConfig:
    """The [state] section that opens `store`'s state again (another connection, as another process has)."""
    from watcher.state.postgres import PostgresStore

    if isinstance(store, PostgresStore):
        return StateConfig(path=Path(), postgres=store.state)
    return StateConfig(path=store.path)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each test using it runs twice: on an SQLite file, and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield Backend("sqlite", tmp_path)
        return
    db: Database = request.getfixturevalue("postgres_db")
    yield Backend("postgresql", tmp_path, db)
