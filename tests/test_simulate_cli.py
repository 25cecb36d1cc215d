"""`convertr-watcher simulate` as an operator meets it: its admin API is listed by `GET /_sim/`, by
`simulate --help` and by the README, and the README's curl lines work as printed."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import cli, wait_until
from tests.support.snippets import free_port

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def simulate() -> Iterator[int]:
    """A real `convertr-watcher simulate --port N` process; yields N once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "simulate", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            assert proc.poll() is None, "simulate exited"
            return False

    try:
        wait_until(listening, 20, "the simulator to listen")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _section() -> str:
    return README.read_text().split("## The simulator", 1)[1].split("\n## ", 1)[0]


def test_get_sim_lists_every_endpoint_as_help_and_readme_do(simulate: int) -> None:
    """`GET /_sim/` answers the admin endpoints; `simulate --help` and the README's table name each one."""
    with urllib.request.urlopen(f"http://127.0.0.1:{simulate}/_sim/", timeout=5) as answer:
        routes = json.loads(answer.read())
    endpoints = {f"{r['method']} {r['path']}" for r in routes}
    assert {"GET /_sim/", "POST /_sim/leads", "PATCH /_sim/leads/{id}", "POST /_sim/faults"} <= endpoints
    assert all(r["what"] for r in routes)
    help_text = cli("simulate", "--help").stdout
    table = set(re.findall(r"^\| `([A-Z]+ /_sim/[^`]*)` \|", _section(), flags=re.M))
    for endpoint in endpoints:
        assert endpoint in help_text, f"simulate --help does not list {endpoint}"
    assert table == endpoints, "the README's table lists exactly the endpoints"


def _request(line: str, port: int) -> urllib.request.Request:
    """The request a README curl line makes (method, headers, body, URL), on the test's port."""
    words = shlex.split(line)
    assert words[0] == "curl"
    method, headers, data, url = "GET", {}, None, ""
    items = iter(words[1:])
    for word in items:
        if word == "-X":
            method = next(items)
        elif word == "-H":
            name, _, value = next(items).partition(": ")
            headers[name] = value
        elif word == "-d":
            data = next(items).encode()
        else:
            url = word.replace("127.0.0.1:8642", f"127.0.0.1:{port}")
    return urllib.request.Request(url, data=data, headers=headers, method=method)


def test_readme_curl_lines_work_as_printed(simulate: int) -> None:
    """Each curl line in the README's simulator section gets a 2xx from a real `simulate` with its defaults."""
    lines = [line for block in re.findall(r"```sh\n(.*?)```", _section(), re.S) for line in block.splitlines()]
    curls = [line for line in lines if line.startswith("curl ")]
    assert len(curls) >= 5
    for line in curls:
        try:
            with urllib.request.urlopen(_request(line, simulate), timeout=5) as answer:
                assert 200 <= answer.status < 300, line
        except urllib.error.HTTPError as exc:
            pytest.fail(f"{line}: {exc.code} {exc.read()[:200]!r}")
