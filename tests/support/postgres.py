"""A real PostgreSQL for tests: a fresh database with a random name per test, dropped after it.

The server is the one on 127.0.0.1:5432 when it answers (this machine and CI run PostgreSQL 15
with trust authentication). Where none answers, a throwaway cluster is started once per session
from the PostgreSQL binaries on the machine (initdb + pg_ctl, on a free port, in a temp folder)
and stopped at the end. Under CI=true a test that needs PostgreSQL fails instead of skipping.

Written here rather than with pytest-postgresql: that plugin picks "existing server" or "start
one" when the fixtures are declared, while we need the choice at run time (answer on 5432 first,
else start), and the start itself is three commands. Fewer moving parts, no extra dependency.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# A password tests put in PostgreSQL URLs (trust authentication ignores it): it must never be logged.
PG_PASSWORD = "pg-secret-never-logged-93d1"
HOST = "127.0.0.1"
PORT = 5432
USER = "postgres"


@dataclass(frozen=True)
class Server:
    """A PostgreSQL server a test may create databases on."""

    host: str
    port: int
    user: str

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"


@dataclass(frozen=True)
class Database:
    """One test's own database on `server`."""

    server: Server
    name: str

    @property
    def url(self) -> str:
        return self.server.url(self.name)


def _answers(host: str, port: int, user: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(host=host, port=port, user=user, dbname="postgres", connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _binaries() -> Path | None:
    """The newest PostgreSQL server binaries on the machine (Debian layout, then PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Throwaway:
    """A cluster of our own: initdb into a temp folder, pg_ctl start on a free loopback port."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="watcher-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        # initdb refuses to run as root: run the cluster as the machine's postgres account then.
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        # Output to a file, not a pipe: the server pg_ctl starts would hold a pipe open for ever.
        with (self.folder / "commands.log").open("ab") as log:
            subprocess.run([*self.run_as, *args], check=True, stdout=log, stderr=log, timeout=120)

    def start(self) -> Server:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "--no-sync")
        options = (
            f"-c listen_addresses={HOST} -c port={self.port} -c unix_socket_directories={self.folder} -c fsync=off"
        )
        pg_ctl = str(self.bin_dir / "pg_ctl")
        self._run(pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.folder / "server.log"), "-w", "start")
        return Server(HOST, self.port, USER)

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """The server for the session: 127.0.0.1:5432, or a throwaway cluster when nothing answers there."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable('psycopg is not installed (pip install -e ".[dev]")')
    if _answers(HOST, PORT, USER):
        yield Server(HOST, PORT, USER)
        return
    bin_dir = _binaries()
    if bin_dir is None:
        _unavailable(f"no PostgreSQL answers on {HOST}:{PORT} and no initdb is installed")
        return
    cluster = Throwaway(bin_dir)
    try:
        server = cluster.start()
    except (subprocess.SubprocessError, OSError, KeyError) as exc:
        cluster.stop()
        _unavailable(f"no PostgreSQL answers on {HOST}:{PORT} and a throwaway cluster did not start: {exc}")
        return
    try:
        yield server
    finally:
        cluster.stop()


def create_database(server: Server) -> Database:
    import psycopg

    name = f"watcher_test_{secrets.token_hex(6)}"
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return Database(server, name)


def drop_database(db: Database) -> None:
    import psycopg

    with psycopg.connect(db.server.url("postgres"), autocommit=True) as conn:
        # FORCE: a test that failed half-way may leave sessions open (a killed daemon's, a proxy's).
        conn.execute(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")


@pytest.fixture
def postgres_db(postgres_server: Server) -> Iterator[Database]:
    """A database of this test's own, with a random name, dropped after the test."""
    db = create_database(postgres_server)
    try:
        yield db
    finally:
        drop_database(db)
