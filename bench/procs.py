"""Helper processes for the benchmarks: the simulator and a fast receiver, each in its own process
so neither competes with the code under measurement for the interpreter lock."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

USERNAME, PASSWORD = "bench@example.com", "bench-password"
# Here rather than in cases.py so the plain baseline programs can sign without importing watcher.
SECRET = "whsec_" + base64.b64encode(b"bench-secret-0123456789abcdef").decode()
ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH, so every child runs the code under measurement."""
    rest = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), rest) if p)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def simulator(leads: int, campaigns: int = 5) -> Iterator[str]:
    """`convertr-watcher simulate` with `leads` seeded leads and no rate limit; yields its base URL."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "watcher",
        "simulate",
        "--port",
        str(port),
        "--leads",
        str(leads),
        "--campaigns",
        str(campaigns),
        "--username",
        USERNAME,
        "--password",
        PASSWORD,
        "--no-rate-limit",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def receiver(log: Path, delay: float = 0.0) -> Iterator[str]:
    """`python -m bench.receiver`: appends `<webhook-id> <lead id> <monotonic>` per request, then
    answers 204 after `delay` seconds."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.receiver", str(port), str(log), str(delay)], env=child_env())
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        proc.terminate()
        proc.wait(10)
