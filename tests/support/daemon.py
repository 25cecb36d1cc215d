"""Drive the real CLI: write configs, start `convertr-watcher run` in a subprocess, signal it, read its state."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.support.state import peek
from watcher.state.store import Store

T = TypeVar("T")

# Known secret values: every test config uses these, and the log scan fails on any of them.
PASSWORD = "pw-Zq8-never-logged"
WEBHOOK_KEY = "whsec_" + base64.b64encode(b"k" * 24 + b"never-logged-key").decode()
WEBHOOK_KEY_2 = "whsec_" + base64.b64encode(b"r" * 24 + b"rotated-secret-2").decode()
USERNAME = "api@example.com"


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, message: str = "condition") -> Any:
    """Poll a condition until it is truthy; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.05)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def write_config(
    folder: Path,
    api_url: str,
    sinks: Sequence[Mapping[str, Any]] = (),
    *,
    convertr: Mapping[str, Any] | None = None,
    leads: Mapping[str, Any] | None = None,
    campaigns: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    extra: str = "",
) -> Path:
    """A config for the simulator at `api_url` with short intervals; tables merged from the arguments
    (`state` replaces the [state] table: `{"url": ...}` for PostgreSQL)."""
    tables: dict[str, dict[str, Any]] = {
        "convertr": {"base_url": api_url, "username": USERNAME, "password": PASSWORD, **(convertr or {})},
        "state": dict(state) if state is not None else {"path": "state.db"},
        "leads": {"interval": 1, "lookback": "30s", "updates": False, "start": "now", **(leads or {})},
        "campaigns": {"enabled": False, **(campaigns or {})},
        "log": {"format": "json", "level": "info"},
    }
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        lines.append("")
    for sink in sinks:
        lines.append("[[sinks]]")
        lines += [f"{k} = {_toml(v)}" for k, v in sink.items()]
        lines.append("")
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + extra)
    path.chmod(0o600)  # it holds literal secrets: readable by others, the CLI would warn about it
    return path


def webhook_sink(url: str, name: str = "crm", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "type": "webhook", "url": url, "secret": WEBHOOK_KEY, "retry_schedule": ["1s"], **overrides}


def cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m watcher ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def healthz(port: int) -> tuple[int, str]:
    """GET /healthz on the daemon's metrics port: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def events_json(config: Path, *args: str) -> list[dict[str, Any]]:
    """`events --format json` with these filters, parsed (one delivery a row); fails on a non-zero exit."""
    result = cli("events", "-c", str(config), "--format", "json", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


class Daemon:
    """`convertr-watcher run -c CONFIG` in a subprocess; its output goes to a log file."""

    def __init__(self, config: Path, env: Mapping[str, str] | None = None, args: Sequence[str] = ()) -> None:
        self.config = config
        self.args = list(args)
        self.state = config.parent / "state.db"
        self.log_path = config.parent / "daemon.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "watcher", "run", "-c", str(self.config), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def read(self, read: Callable[[Store], T], default: T) -> T:
        """`read(store)` on the daemon's state file, read-only, while it runs; `default` before it exists."""
        return peek(self.state, read, default)

    def polls(self, stream: str = "leads.created") -> int:
        cursor = self.read(lambda store: store.cursor(stream), None)
        return cursor.polls if cursor is not None else 0

    def wait_polls(self, n: int, stream: str = "leads.created", timeout: float = 30.0) -> None:
        """Wait until `stream` has finished `n` more walks than it had when called."""
        target = self.polls(stream) + n
        wait_until(
            lambda: self.polls(stream) >= target or not self.running(),
            timeout,
            f"{n} completed polls of {stream}",
        )
        assert self.running(), f"daemon exited:\n{self.log()[-3000:]}"
