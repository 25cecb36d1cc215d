"""Proxies named in the daemon's environment, as an operator's host sets them: the real CLI in a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import WEBHOOK_KEY, cli, webhook_sink, write_config

PROXY_PASSWORD = "prx-Hq4-never-shown"


@pytest.mark.parametrize("variable", ["ALL_PROXY", "HTTP_PROXY"])
# `once` (like `run`) cannot start: a configuration error; `check --connect` reports the API unreachable.
@pytest.mark.parametrize(("command", "code"), [(("once",), 78), (("check", "--connect"), 1)])
def test_a_socks_proxy_in_the_environment_is_one_line_not_a_traceback(
    tmp_path: Path, variable: str, command: tuple[str, ...], code: int
) -> None:
    """A SOCKS proxy (which the Convertr client cannot use without an extra) is one line naming the
    cause, never a traceback, and never quotes the proxy's credentials."""
    config = write_config(tmp_path, "http://127.0.0.1:9", [webhook_sink("http://127.0.0.1:9/hook", secret=WEBHOOK_KEY)])
    env = {v: "" for v in ("ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}
    # Both spellings: an empty lower-case one would unset the upper-case one (urllib's reading).
    env[variable] = env[variable.lower()] = f"socks5://watcher:{PROXY_PASSWORD}@127.0.0.1:1"
    result = cli(*command, "-c", str(config), env=env)
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output
    assert PROXY_PASSWORD not in output
    [line] = [text for text in output.splitlines() if "SOCKS" in text]
    assert "httpx[socks]" in line
