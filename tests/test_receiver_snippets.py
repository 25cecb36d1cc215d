"""The README's JavaScript and Go receivers, run as printed, against what the daemon sends.

Each snippet becomes a real server on loopback; `send-test --type lead.updated` delivers a sample
through the real sink, signed with two keys while the receiver knows only the second (rotation);
a body holding `12.0` signed as the daemon signs passes (raw bytes are verified), and a changed
body is refused. The JavaScript one needs Node and the npm package `tests/js/package.json` names
(installed here into a temporary folder); the Go one needs a Go toolchain (`make test` installs
golang-go as root), and is skipped only where none is installed, never under CI=true.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.daemon import WEBHOOK_KEY, WEBHOOK_KEY_2, cli, wait_until, write_config
from tests.support.snippets import free_port, npm_install, readme_blocks, tool
from watcher import __version__
from watcher.signing import decode_secret, webhook_headers


def _snippet(language: str) -> str:
    [block] = readme_blocks(language)
    return block


class Running:
    """A receiver process on `port`, its stdout collected in a file."""

    def __init__(self, argv: list[str], folder: Path) -> None:
        self.port = free_port()
        self.out = folder / "receiver.out"
        env = {**os.environ, "WEBHOOK_SECRET": WEBHOOK_KEY_2, "PORT": str(self.port)}
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._listening, 60, f"{argv[0]} to listen")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.out.read_text()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def post(self, body: bytes, headers: dict[str, str]) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/hook", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(10)
        return self.out.read_text()


def _check_receiver(receiver: Running, tmp_path: Path) -> None:
    """What every README receiver must do with the daemon's requests."""
    sink = {"name": "crm", "type": "webhook", "url": f"http://127.0.0.1:{receiver.port}/hook"}
    config = write_config(tmp_path, "http://127.0.0.1:9", [{**sink, "secret": f"{WEBHOOK_KEY} {WEBHOOK_KEY_2}"}])
    sent = cli("send-test", "-c", str(config), "--sink", "crm", "--type", "lead.updated")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "accepted: HTTP 204" in sent.stdout

    body = b'{"type":"lead.updated","timestamp":"2026-11-26T18:50:00.000Z","data":{"payout":12.0}}'
    keys = [decode_secret(WEBHOOK_KEY), decode_secret(WEBHOOK_KEY_2)]
    headers = webhook_headers("evt_rawbytes", int(time.time()), body, keys, __version__)
    assert receiver.post(body, headers) == 204, "the raw bytes, 12.0 and all, verify"
    assert receiver.post(body.replace(b"12.0", b"12.5"), headers) == 400, "a changed body is refused"
    stale = webhook_headers("evt_stale", int(time.time()) - 3600, body, keys, __version__)
    assert receiver.post(body, stale) == 400, "an hour-old timestamp is refused"

    printed = receiver.stop()
    assert "lead.updated" in printed and '"changes"' in printed
    assert "evt_stale" not in printed


@pytest.fixture(scope="module")
def npm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the npm packages of tests/js/package.json installed, as a receiver's project has them."""
    tool("node")
    folder = tmp_path_factory.mktemp("js")
    npm_install(folder)
    return folder


def test_javascript_receiver_verifies_what_the_daemon_sends(npm_folder: Path, tmp_path: Path) -> None:
    """The README's JavaScript receiver (Node, npm standardwebhooks) takes the daemon's requests, refuses forgeries."""
    (npm_folder / "receiver.mjs").write_text(_snippet("js"))
    receiver = Running([tool("node"), "receiver.mjs"], npm_folder)
    try:
        _check_receiver(receiver, tmp_path)
    finally:
        receiver.proc.kill()


def test_go_receiver_verifies_what_the_daemon_sends(tmp_path: Path) -> None:
    """The README's Go receiver (standard library only) builds, accepts the daemon's requests and refuses forgeries."""
    go = tool("go", optional=True)
    folder = tmp_path / "go"
    folder.mkdir()
    (folder / "receiver.go").write_text(_snippet("go"))
    built = subprocess.run(
        [go, "build", "-o", "receiver", "receiver.go"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GO111MODULE": "off"},
    )
    assert built.returncode == 0, built.stderr
    receiver = Running([str(folder / "receiver")], folder)
    try:
        _check_receiver(receiver, tmp_path)
    finally:
        receiver.proc.kill()
