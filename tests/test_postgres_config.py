"""`[state] url`: PostgreSQL state in the configuration: its forms, refusals, and that the URL stays secret."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.postgres import PG_PASSWORD
from tests.test_broker_config import _BLOCKER
from watcher.config import default_schema, load_config
from watcher.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DB_PASSWORD = PG_PASSWORD
URL = f"postgresql://watcher:{DB_PASSWORD}@db.internal:5433/convertr?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem"

HEAD = """
[convertr]
base_url = "https://acme.cvtr.io"
username = "api@acme.example"
password_env = "PW"

[state]
"""


def _write(tmp_path: Path, state: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(HEAD + state)
    path.chmod(0o600)
    return path


def _cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PW": "x", **(env or {})},
        cwd=ROOT,
    )


def test_a_url_gives_postgres_state_with_tls_parameters_passed_through(tmp_path: Path) -> None:
    """The URL is kept as written (sslmode, sslrootcert reach libpq); host, port, database and schema parsed."""
    config = load_config(_write(tmp_path, f'url = "{URL}"\n'), {"PW": "x"})
    pg = config.state.postgres
    assert pg is not None
    assert pg.url == URL
    assert (pg.host, pg.port, pg.dbname, pg.schema) == ("db.internal", 5433, "convertr", "convertr_acme")
    assert pg.shown() == "postgresql://db.internal:5433/convertr (schema convertr_acme)"
    # The secret: the redactor gets the URL and its password; no repr shows either.
    assert URL in config.secret_values() and DB_PASSWORD in config.secret_values()
    assert DB_PASSWORD not in repr(config)


@pytest.mark.parametrize("form", ["url_env", "url_file"])
def test_url_env_and_url_file(tmp_path: Path, form: str) -> None:
    (tmp_path / "db-url").write_text(URL + "\n")
    value = "STATE_URL" if form == "url_env" else "db-url"
    config = load_config(_write(tmp_path, f'{form} = "{value}"\n'), {"PW": "x", "STATE_URL": URL})
    assert config.state.postgres is not None
    assert config.state.postgres.url == URL
    assert config.state.postgres.url_is_secret
    assert URL in config.secret_values()


@pytest.mark.parametrize(
    ("state", "key", "problem"),
    [
        (f'path = "state.db"\nurl = "{URL}"\n', "state.url", "give either state.path (SQLite) or state.url"),
        ('delivered_retention = "1d"\n', "state.path", "missing required key (or state.url for PostgreSQL)"),
        ('path = "state.db"\nschema = "x"\n', "state.schema", "only with state.url"),
        (f'url = "{URL.replace("postgresql", "mysql")}"\n', "state.url", "must be a postgresql:// URL"),
        (f'url = "{URL.replace("/convertr?", "/?")}"\n', "state.url", "must be a postgresql:// URL"),
        (f'url = "{URL}&sslmod=require"\n', "state.url", "is not a connection URL libpq accepts"),
        (f'url = "{URL.replace(":5433", ":99999")}"\n', "state.url", "must be a postgresql:// URL"),
        (f'url = "{URL}"\nschema = "Bad-Name"\n', "state.schema", "must be a lower-case SQL name"),
        (f'url = "{URL}"\nschema = "pg_catalog"\n', "state.schema", "must be a lower-case SQL name"),
        (f'url = "{URL}"\nurl_env = "X"\n', "state.url", "give only one of url, url_env, url_file"),
        ('path = "state.db"\nlease = "5s"\n', "state.lease", "only with state.url (PostgreSQL)"),
        (f'url = "{URL}"\nlease = "2s"\n', "state.lease", "must be from 3s to 300s (5m), got 2s"),
        (f'url = "{URL}"\nlease = 2.9\n', "state.lease", "must be from 3s to 300s (5m), got 2.9s"),
        (f'url = "{URL}"\nlease = "5m1s"\n', "state.lease", "must be from 3s to 300s (5m), got 301s"),
        (f'url = "{URL}"\nlease = "1h"\n', "state.lease", "must be from 3s to 300s (5m), got 3600s"),
        (f'url = "{URL}"\nlease = 0\n', "state.lease", "must be a positive duration"),
        (f'url = "{URL}"\nlease = "soon"\n', "state.lease", "must be a duration"),
        (f'url = "{URL}"\nlease = true\n', "state.lease", "must be a duration"),
    ],
)
def test_refusals_exit_78_naming_the_key_and_never_the_url(tmp_path: Path, state: str, key: str, problem: str) -> None:
    config = _write(tmp_path, state)
    with pytest.raises(ConfigError) as caught:
        load_config(config, {"PW": "x"})
    assert caught.value.path == key
    assert problem in caught.value.problem
    result = _cli(config, "check")
    assert result.returncode == 78
    assert f"{key}: " in result.stderr and problem in result.stderr
    assert DB_PASSWORD not in result.stderr + result.stdout
    assert "db.internal" not in result.stderr  # nothing of the URL, not even its host


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(None, 15.0), ("3", 3.0), ('"3s"', 3.0), ("15", 15.0), ('"90s"', 90.0), ('"2m30s"', 150.0), ('"5m"', 300.0)],
)
def test_the_lease_is_a_duration_from_3s_to_5m_defaulting_to_15s(
    tmp_path: Path, given: str | None, seconds: float
) -> None:
    """`[state] lease` reaches the frozen config, and from there every timing derived from it."""
    line = "" if given is None else f"lease = {given}\n"
    pg = load_config(_write(tmp_path, f'url = "{URL}"\n{line}'), {"PW": "x"}).state.postgres
    assert pg is not None
    assert pg.lease == seconds
    assert pg.timings.ttl == seconds


def test_check_names_the_lease_and_its_takeover_bound(tmp_path: Path) -> None:
    result = _cli(_write(tmp_path, f'url = "{URL}"\nlease = "3s"\n'), "check")
    assert result.returncode == 0, result.stderr
    assert "(schema convertr_acme), lease 3s (a standby leads within 4.6s of a crash)" in result.stdout


def test_default_schema_is_a_plain_identifier_from_the_enterprise() -> None:
    table = {
        "https://acme.cvtr.io": "convertr_acme",
        "https://Big-Corp.cvtr.io": "convertr_big_corp",
        "http://127.0.0.1:8642": "convertr_127",
        "https://x" + "y" * 80 + ".cvtr.io": "convertr_x" + "y" * 53,
    }
    for base_url, schema in table.items():
        assert default_schema(base_url) == schema


def test_schema_can_be_chosen(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, f'url = "{URL}"\nschema = "acme_prod"\n'), {"PW": "x"})
    assert config.state.postgres is not None and config.state.postgres.schema == "acme_prod"


def test_check_shows_host_and_database_only(tmp_path: Path) -> None:
    result = _cli(_write(tmp_path, f'url = "{URL}"\n'), "check")
    assert result.returncode == 0, result.stderr
    assert "state: postgresql://db.internal:5433/convertr (schema convertr_acme)" in result.stdout
    assert DB_PASSWORD not in result.stdout + result.stderr
    assert "watcher:" not in result.stdout  # the user name neither


def test_check_state_on_postgresql_opens_no_file_and_says_why_it_cannot_reach_the_database(tmp_path: Path) -> None:
    """Nothing opens a file in place of the database: `check --state` with no server listening exits 1 in
    one line naming host, port and database, never the user or password.
    (The checks of a reachable state: tests/test_postgres_ops.py.)"""
    closed = f"postgresql://watcher:{DB_PASSWORD}@127.0.0.1:1/convertr"
    config = _write(tmp_path, f'url = "{closed}"\n')
    result = _cli(config, "check", "--state")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        "convertr-watcher: cannot check the state in postgresql://127.0.0.1:1/convertr (schema convertr_acme): "
        "cannot connect: Connection refused"
    )
    assert list(tmp_path.iterdir()) == [config]


def test_without_psycopg_a_postgres_config_exits_78_naming_the_extra(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked={"psycopg"}))
    config = _write(tmp_path, f'url = "{URL}"\n')
    result = _cli(config, "check", env={"PYTHONPATH": str(site)})
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"convertr-watcher: {config}: state.url: PostgreSQL state needs the [postgres] extra: "
        'pip install "convertr-watcher[postgres]"'
    ]
    # The SQLite backend needs no extra.
    assert _cli(_write(tmp_path, 'path = "s.db"\n'), "check", env={"PYTHONPATH": str(site)}).returncode == 0
