from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_ready_status_watchdog_stopping_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    """Each call arrives as one datagram of KEY=value lines on a filesystem socket."""
    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert received(sock) == {"READY": "1"}
    assert n.ready(status="polling")
    assert received(sock) == {"READY": "1", "STATUS": "polling"}
    assert n.status("leads: 3 new")
    assert received(sock) == {"STATUS": "leads: 3 new"}
    assert n.watchdog()
    assert received(sock) == {"WATCHDOG": "1"}
    assert n.stopping()
    assert received(sock) == {"STOPPING": "1"}
    assert n.extend_timeout(2.5)
    assert received(sock) == {"EXTEND_TIMEOUT_USEC": "2500000"}


def test_abstract_socket_is_reached_through_the_at_sign(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET starting with '@' names the abstract namespace."""
    name = f"convertr-watcher-test-{os.getpid()}-{tmp_path.name}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.send(status="hello", mainpid=42)
        assert received(sock) == {"STATUS": "hello", "MAINPID": "42"}
    finally:
        sock.close()


def test_newlines_in_a_value_cannot_inject_another_assignment(listener: tuple[socket.socket, str]) -> None:
    """A status text with a newline stays one STATUS line."""
    sock, path = listener
    Notifier.from_environ({"NOTIFY_SOCKET": path}).status("a\nREADY=1")
    assert received(sock) == {"STATUS": "a READY=1"}


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """Outside systemd nothing is sent and nothing fails."""
    n = Notifier.from_environ({})
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()
    assert n.watchdog_interval() is None


def test_unsupported_address_disables_notifications() -> None:
    """A relative or empty-abstract address is ignored rather than guessed at."""
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "relative.sock"}).enabled
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "@"}).enabled


def test_send_failure_never_raises_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A vanished socket makes sends return False with a single warning."""
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.WARNING, logger="watcher.notify"):
        assert not n.ready()
        assert not n.watchdog()
        assert not n.stopping()
    assert len([r for r in caplog.records if r.name == "watcher.notify"]) == 1


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "180000000"}, 81.0),
        ({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": "1234"}, 81.0),
        ({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": "999"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "junk"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None, tmp_path: Path) -> None:
    """The ping interval is under half of WATCHDOG_USEC, and only for the process it names."""
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "n.sock"), **environ}, pid=1234)
    interval = n.watchdog_interval()
    assert interval == (None if expected is None else pytest.approx(expected))
    if interval is not None:
        assert interval < int(environ["WATCHDOG_USEC"]) / 2_000_000


def test_watchdog_interval_defaults_to_this_process(tmp_path: Path) -> None:
    """Without an explicit pid the WATCHDOG_PID check compares with os.getpid()."""
    env = {
        "NOTIFY_SOCKET": str(tmp_path / "n.sock"),
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    assert Notifier.from_environ(env).watchdog_interval() == pytest.approx(0.9)
