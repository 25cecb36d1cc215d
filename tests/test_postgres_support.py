"""The PostgreSQL test support: a database per test that is gone after it, and the throwaway cluster."""

from __future__ import annotations

import psycopg

from tests.support.postgres import Server, Throwaway, _binaries, create_database, drop_database


def _exists(server: Server, name: str) -> bool:
    with psycopg.connect(server.url("postgres")) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def test_a_database_per_test_dropped_even_with_a_session_left_open(postgres_server: Server) -> None:
    db = create_database(postgres_server)
    other = create_database(postgres_server)
    assert db.name != other.name
    left_open = psycopg.connect(db.url)
    left_open.execute("CREATE TABLE t (x int)")
    assert _exists(postgres_server, db.name)
    drop_database(db)  # FORCE ends the open session
    drop_database(other)
    assert not _exists(postgres_server, db.name) and not _exists(postgres_server, other.name)
    assert left_open.closed or left_open.broken or left_open.info.transaction_status is not None
    left_open.close()


def test_a_throwaway_cluster_starts_from_the_binaries_and_stops() -> None:
    """What the fixture does where nothing answers on 5432: initdb + pg_ctl on a free port."""
    bin_dir = _binaries()
    assert bin_dir is not None, "the PostgreSQL server binaries are part of this machine's set-up"
    cluster = Throwaway(bin_dir)
    server = cluster.start()
    try:
        assert server.port != 5432
        db = create_database(server)
        with psycopg.connect(db.url) as conn:
            assert conn.execute("SELECT current_setting('port')::int").fetchone() == (server.port,)
        drop_database(db)
    finally:
        cluster.stop()
    assert not cluster.folder.exists()
