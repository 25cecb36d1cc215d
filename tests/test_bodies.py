"""Bounded bodies: a gzip bomb from a receiver or from the API costs a small excerpt or the ceiling, never its size.

Memory is measured on the real CLI in a child process: its peak RSS comes from wait4(), so only
that process is counted.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import PASSWORD, USERNAME, webhook_sink, write_config
from tests.support.receiver import Receiver, Reply
from watcher.clock import FakeClock
from watcher.config import ConvertrConfig, load_config
from watcher.convertr import ConvertrClient
from watcher.errors import MalformedResponse, ResponseTooLarge

BOMB_MIB = 300
PEAK_LIMIT_MIB = 150
DEFAULT_CEILING = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """About 300 KB of gzip that inflates to 300 MiB of zeros, built without ever holding the 300 MiB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(BOMB_MIB)]
    parts.append(packer.flush())
    return b"".join(parts)


def run_measured(args: Sequence[str], folder: Path, timeout: float = 120.0) -> tuple[int, str, float]:
    """Run `python -m watcher ARGS`; its exit status, stdout and peak RSS in MiB (that process alone)."""
    out_path = folder / "stdout.txt"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", *args], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            raise AssertionError(f"{args} still running after {timeout}s")
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out_path.read_text(errors="replace"), usage.ru_maxrss / 1024  # ru_maxrss is in KiB


def api_url(rx: Receiver) -> str:
    return f"http://127.0.0.1:{rx.port}"


@pytest.mark.parametrize(("kind", "status", "code"), [("webhook", 200, 0), ("slack", 500, 1)])
def test_a_sink_reads_only_an_excerpt_of_a_gzip_bomb(
    tmp_path: Path, bomb: bytes, kind: str, status: int, code: int
) -> None:
    """A receiver's 300 MiB gzip answer is read to a few KB only: the status decides, and memory stays small."""
    with Receiver() as rx:
        rx.respond(status, bomb, {"content-encoding": "gzip", "content-type": "text/plain"})
        sink = webhook_sink(rx.url) if kind == "webhook" else {"name": "crm", "type": "slack", "url": rx.url}
        config = write_config(tmp_path, "http://127.0.0.1:9", [sink])
        exit_status, output, peak = run_measured(["send-test", "-c", str(config), "--sink", "crm"], tmp_path)
        [request] = rx.requests
    assert exit_status == code, output
    assert peak < PEAK_LIMIT_MIB, f"peak RSS {peak:.0f} MiB"
    assert request.headers["accept-encoding"] == "identity"
    if code == 0:
        assert "crm: accepted: HTTP 200" in output
    else:
        assert "crm: not accepted: HTTP 500 Internal Server Error" in output


def test_an_api_gzip_bomb_is_a_classified_error_within_bounded_memory(tmp_path: Path, bomb: bytes) -> None:
    """A 300 MiB gzip login answer stops at the 64 MiB default ceiling: ResponseTooLarge, small RSS,
    and not retried as it is (the same request is as large the next time)."""
    with Receiver() as rx:
        rx.respond(200, bomb, {"content-encoding": "gzip", "content-type": "application/json"})
        config = write_config(tmp_path, api_url(rx))
        assert load_config(config).convertr.max_response_bytes == DEFAULT_CEILING
        exit_status, output, peak = run_measured(["check", "-c", str(config), "--connect"], tmp_path)
        logins = [r for r in rx.requests if r.path == "/api/login"]
    assert exit_status == 1, output
    assert peak < PEAK_LIMIT_MIB, f"peak RSS {peak:.0f} MiB"
    expected = (
        f"login: cannot reach the API (Convertr POST /api/login: 200 answer larger than {DEFAULT_CEILING} bytes "
        "once decoded ([convertr] max_response_bytes); not read further)"
    )
    assert expected in output
    assert len(logins) == 1, "too large is not retried as it is: the same request is as large the next time"
    assert logins[0].headers["accept-encoding"] == "gzip, deflate"


def _encode(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, no zlib header
    return packer.compress(body) + packer.flush()


def _client(rx: Receiver, **overrides: Any) -> ConvertrClient:
    cfg = ConvertrConfig(base_url=api_url(rx), username=USERNAME, password=PASSWORD, **overrides)
    return ConvertrClient(cfg, clock=FakeClock())


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
def test_compressed_pages_are_read_whole(encoding: str) -> None:
    """gzip, zlib deflate and headerless deflate answers decode to the same page as plain JSON would."""
    members = [{"@id": f"/api/v4/leads/{i}", "id": i, "note": "x" * 500} for i in range(1, 101)]
    page = {"hydra:member": members, "hydra:totalItems": 100}
    login = {"access_token": "tok-gzip-test", "expires_in": 3600}
    header = "gzip" if encoding == "gzip" else "deflate"

    def reply(doc: object) -> Reply:
        encoded = _encode(json.dumps(doc).encode(), encoding)
        return Reply(200, encoded, {"content-encoding": header, "content-type": "application/ld+json"})

    async def go(rx: Receiver) -> list[dict[str, Any]]:
        async with _client(rx) as client:
            return (await client.page("leads")).members

    with Receiver() as rx:
        rx.respond_sequence([reply(login), reply(page)])
        assert asyncio.run(go(rx)) == members


def test_an_over_ceiling_or_unreadable_page_is_a_classified_error() -> None:
    """A page over a small ceiling is ResponseTooLarge; an encoding the client never asked for is MalformedResponse."""
    login = Reply(200, json.dumps({"access_token": "tok-cap-test", "expires_in": 3600}).encode())
    big = json.dumps({"hydra:member": [{"id": i, "note": "y" * 1000} for i in range(200)]}).encode()

    async def read(rx: Receiver, **overrides: Any) -> None:
        async with _client(rx, **overrides) as client:
            await client.page("leads")

    with Receiver() as rx:
        rx.respond_sequence([login])
        rx.respond(200, big, {"content-type": "application/ld+json"})
        with pytest.raises(ResponseTooLarge) as too_large:
            asyncio.run(read(rx, max_response_bytes=65_536))
        assert str(too_large.value) == (
            "Convertr GET /api/v4/leads: 200 answer larger than 65536 bytes once decoded "
            "([convertr] max_response_bytes); not read further"
        )
        assert too_large.value.status == 200
        # Not retried as it is: a walk splits such a page instead (tests/test_walk_load.py).
        assert len([r for r in rx.requests if r.path.startswith("/api/v4/leads")]) == 1

    with Receiver() as rx:
        rx.respond_sequence([login])
        rx.respond(200, b"\x8b\x00brotli?", {"content-encoding": "br"})
        with pytest.raises(MalformedResponse, match=r"^Convertr GET /api/v4/leads: 200 with an unreadable body"):
            asyncio.run(read(rx))
