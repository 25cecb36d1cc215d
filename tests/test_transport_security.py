"""Nothing crosses the network in clear by accident: https beyond loopback, a capped local metrics port."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.daemon import PASSWORD, WEBHOOK_KEY
from watcher.config import load_config
from watcher.errors import ConfigError
from watcher.metrics import MAX_CONNECTIONS, Metrics, serve


def _config(folder: Path, base_url: str, *, convertr: str = "", sink: str = "", metrics: str = "") -> Path:
    path = folder / "config.toml"
    path.write_text(
        f'[convertr]\nbase_url = "{base_url}"\nusername = "u@example.com"\npassword = "{PASSWORD}"\n{convertr}\n'
        f'[state]\npath = "state.db"\n\n[metrics]\n{metrics}\n'
        + (f'[[sinks]]\nname = "crm"\ntype = "webhook"\nsecret = "{WEBHOOK_KEY}"\n{sink}\n' if sink else "")
    )
    return path


@pytest.mark.parametrize("url", ["http://127.0.0.1:8642", "http://[::1]:8642", "http://localhost:8642"])
def test_plain_http_is_accepted_to_loopback(tmp_path: Path, url: str) -> None:
    """The simulator and a local receiver keep working over plain http on loopback."""
    config = load_config(_config(tmp_path, url, sink=f'url = "{url}/hook"'))
    assert config.convertr.base_url == url


def test_plain_http_beyond_loopback_is_refused_unless_allowed(tmp_path: Path) -> None:
    """http:// to another host is a config error naming the key; allow_http = true accepts it."""
    with pytest.raises(ConfigError, match=r"^convertr\.base_url: must be an https:// URL"):
        load_config(_config(tmp_path, "http://acme.cvtr.io"))
    assert load_config(_config(tmp_path, "http://acme.cvtr.io", convertr="allow_http = true")).convertr.base_url
    (tmp_path / "hook-url").write_text("http://hooks.example.com/secret-path-token")
    with pytest.raises(ConfigError, match=r"^sinks\[0\]\.url_file: must be an https:// URL") as refused:
        load_config(_config(tmp_path, "https://acme.cvtr.io", sink='url_file = "hook-url"'))
    assert "secret-path-token" not in str(refused.value)
    allowed = load_config(_config(tmp_path, "https://acme.cvtr.io", sink='url_file = "hook-url"\nallow_http = true'))
    assert allowed.sinks[0].url.startswith("http://")


def test_a_non_loopback_metrics_bind_needs_allow_remote(tmp_path: Path) -> None:
    """listen = "0.0.0.0:9464" is refused until [metrics] allow_remote = true."""
    with pytest.raises(ConfigError, match=r"^metrics\.listen: .*not a loopback address.*metrics\.allow_remote"):
        load_config(_config(tmp_path, "https://a.cvtr.io", metrics='listen = "0.0.0.0:9464"'))
    opted = load_config(_config(tmp_path, "https://a.cvtr.io", metrics='listen = "0.0.0.0:9464"\nallow_remote = true'))
    assert opted.metrics.listen == ("0.0.0.0", 9464)
    assert load_config(_config(tmp_path, "https://a.cvtr.io", metrics='listen = "[::1]:9464"')).metrics.listen


def test_metrics_listener_caps_its_connections() -> None:
    """Past the cap the oldest connection still sending headers makes room: clients holding connections
    open cannot shut a scrape out, and no more than the cap are held."""

    async def scenario() -> None:
        server = await serve(Metrics(0.0), "127.0.0.1", 0, lambda: (True, "ok"))
        port = server.sockets[0].getsockname()[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        for _reader, writer in idle:
            writer.write(b"GET /metrics HTTP/1.1\r\n")  # a slowloris: headers never end
        extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        try:
            async with asyncio.timeout(1.5):  # inside the 2 s header deadline: room was made, not waited for
                assert [await _closed(reader) for reader, _writer in idle[:4]] == [True] * 4
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(1.5):
                answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200")
        finally:
            for _reader, writer in idle + extra:
                writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server ended the connection without an answer (a reset or an orderly close)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True
