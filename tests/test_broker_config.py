"""Broker sink configuration: the keys each type takes, the refusals, and a missing extra (exit 78)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.daemon import PASSWORD, WEBHOOK_KEY
from watcher.config import load_config
from watcher.errors import ConfigError

BROKER_PASSWORD = "amqp-pw-never-in-errors"


def _config(tmp_path: Path, sink: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [convertr]
            base_url = "http://127.0.0.1:9"
            username = "api@example.com"
            password = "{PASSWORD}"
            [state]
            path = "state.db"
            [[sinks]]
            name = "bus"
            """
        )
        + textwrap.dedent(sink)
    )
    path.chmod(0o600)
    return path


def _error(tmp_path: Path, sink: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(_config(tmp_path, sink))
    return str(caught.value)


def test_broker_sinks_load_with_their_destinations(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        f"""
        type = "nats"
        url = "nats://127.0.0.1:4222"
        subject = "convertr.{{type}}"
        [[sinks]]
        name = "rabbit"
        type = "amqp"
        url = "amqp://guest:{BROKER_PASSWORD}@127.0.0.1:5672/"
        exchange = "convertr"
        secret = "{WEBHOOK_KEY}"
        [[sinks]]
        name = "stream"
        type = "redis"
        url = "redis://127.0.0.1:6379/0"
        stream = "convertr:events"
        maxlen = 100000
        """,
    )
    config = load_config(path)
    bus, rabbit, stream = config.sinks
    assert (bus.type, bus.subject, bus.include_pii, bus.concurrency) == ("nats", "convertr.{type}", True, 8)
    assert (rabbit.exchange, rabbit.routing_key, rabbit.secrets) == ("convertr", "{type}", (WEBHOOK_KEY,))
    assert (stream.stream, stream.maxlen) == ("convertr:events", 100000)
    # Broker URLs are secrets, and so is the password inside one, on its own.
    assert rabbit.url in config.secret_values() and BROKER_PASSWORD in config.secret_values()
    assert bus.url in config.secret_values()


@pytest.mark.parametrize(
    ("sink", "expected"),
    [
        ('type = "nats"\nurl = "nats://127.0.0.1:4222"\n', "sinks[0].subject: missing required key"),
        (
            'type = "nats"\nurl = "nats://127.0.0.1:4222"\nsubject = "convertr.*"\n',
            "sinks[0].subject: must be a NATS subject",
        ),
        (
            'type = "nats"\nurl = "nats://127.0.0.1:4222"\nsubject = "convertr.{kind}"\n',
            "sinks[0].subject: {type} is the only placeholder",
        ),
        ('type = "amqp"\nurl = "amqp://127.0.0.1/"\n', "sinks[0].exchange: missing required key"),
        ('type = "redis"\nurl = "redis://127.0.0.1/0"\n', "sinks[0].stream: missing required key"),
        (
            'type = "redis"\nurl = "redis://127.0.0.1/0"\nstream = "s"\nmaxlen = 0\n',
            "sinks[0].maxlen: must be an integer",
        ),
        (
            'type = "redis"\nurl = "redis://127.0.0.1/0"\nstream = "s"\nsubject = "x"\n',
            "sinks[0].subject: only for nats",
        ),
        ('type = "webhook"\nurl = "https://example.com/h"\nstream = "s"\n', "sinks[0].stream: only for redis"),
        ('type = "nats"\nurl = "https://127.0.0.1:4222"\nsubject = "x"\n', "sinks[0].url: must be a tls:// or nats://"),
        ('type = "kafka"\nurl = "kafka://127.0.0.1"\n', 'sinks[0].type: must be one of "webhook", "slack", "nats"'),
    ],
)
def test_broker_sink_refusals_name_the_key(tmp_path: Path, sink: str, expected: str) -> None:
    assert _error(tmp_path, sink).startswith(expected)


def test_plain_broker_url_beyond_loopback_needs_allow_http_and_is_never_quoted(tmp_path: Path) -> None:
    """An unencrypted broker connection across the network is refused unless allowed; the error
    names the key, never the URL (it carries the password)."""
    url = f"amqp://guest:{BROKER_PASSWORD}@rabbit.internal:5672/"
    error = _error(tmp_path, f'type = "amqp"\nurl = "{url}"\nexchange = "x"\n')
    assert error.startswith("sinks[0].url: must be a amqps:// URL (plain amqp:// only to a loopback host")
    assert BROKER_PASSWORD not in error and "rabbit.internal" not in error
    config = load_config(_config(tmp_path, f'type = "amqp"\nurl = "{url}"\nexchange = "x"\nallow_http = true\n'))
    assert config.sinks[0].url == url
    assert load_config(_config(tmp_path, 'type = "amqp"\nurl = "amqps://rabbit.internal/"\nexchange = "x"\n'))


# A meta path finder that makes one package unimportable, as on a host where its extra was never
# installed. It is loaded by Python itself (sitecustomize), before any of our code runs.
_BLOCKER = """
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
"""


@pytest.mark.parametrize(
    ("kind", "module", "where"),
    [("nats", "nats", 'subject = "x"'), ("amqp", "aiormq", 'exchange = "x"'), ("redis", "redis", 'stream = "x"')],
)
def test_a_type_whose_extra_is_missing_exits_78_naming_the_extra(
    tmp_path: Path, kind: str, module: str, where: str
) -> None:
    """With the client library unimportable, `check` (and so `run`) exits 78 saying which extra to install."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked={module}))
    config = _config(tmp_path, f'type = "{kind}"\nurl = "{kind}://127.0.0.1/"\n{where}\n')
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    # `run` loads the configuration the same way; one type shows it refuses as `check` does.
    for command in ("check", "run") if kind == "nats" else ("check",):
        result = subprocess.run(
            [sys.executable, "-m", "watcher", command, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert result.returncode == 78, result.stderr
        assert result.stderr.strip().splitlines() == [
            f'convertr-watcher: {config}: sinks[0].type: "{kind}" sinks need the [{kind}] extra: '
            f'pip install "convertr-watcher[{kind}]"'
        ]
    # The same config with the library importable is valid.
    assert load_config(config).sinks[0].type == kind


def test_example_config_documents_the_broker_sinks_and_they_load(tmp_path: Path) -> None:
    """config.example.toml's commented broker blocks name every broker key and, uncommented, load."""
    from tests.test_config import EXAMPLE, EXAMPLE_ENVIRON

    text = EXAMPLE.read_text()
    head, _, brokers = text.partition("# Broker sinks:")
    assert brokers, "the example has no broker sinks"
    for key in ("subject", "exchange", "routing_key", "stream", "maxlen"):
        assert f"\n# {key} = " in brokers, key
    uncommented = re.sub(r"^# (\[\[sinks\]\]|[a-z_]+ = .*)$", r"\1", brokers, flags=re.M)
    path = tmp_path / "config.toml"
    path.write_text(head + "#" + uncommented)
    environ = {
        **EXAMPLE_ENVIRON,
        "NATS_URL": "nats://127.0.0.1:4222",
        "AMQP_URL": f"amqps://watcher:{BROKER_PASSWORD}@rabbit.example.com/",
        "REDIS_URL": "rediss://:secret@redis.example.com:6380/0",
    }
    config = load_config(path, environ)
    bus, rabbit, stream = config.sinks[2:]
    assert (bus.type, bus.subject) == ("nats", "convertr.{type}")
    assert (rabbit.type, rabbit.exchange, rabbit.routing_key) == ("amqp", "convertr", "{type}")
    assert (stream.type, stream.stream, stream.maxlen) == ("redis", "convertr:events", 1000000)
