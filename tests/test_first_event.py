"""The README's "From install to a first event" walk, run line by line as printed.

Only what a machine shared with other test runs forces is changed: the simulator and the receiver
listen on free ports instead of 8642 and 8000, and `~/cw/bin/convertr-watcher` is this checkout's
`python -m watcher` (a plain install is tests/test_install.py's). Between lines the test waits as a
person would: for a server to listen, for the daemon's first poll before adding a lead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.daemon import wait_until
from tests.support.snippets import free_port, listening, npm_install, readme_blocks, tool

SECTION = "From install to a first event"
BINARY = "~/cw/bin/convertr-watcher"


def test_the_first_event_walk_works_as_printed(tmp_path: Path) -> None:
    """Simulator, receiver, check --connect, send-test, run, a lead added by curl: the receiver verifies it,
    `events` shows it delivered and `status` a running daemon."""
    tool("node")
    npm_install(tmp_path)
    [receiver] = [b for b in readme_blocks("js") if "standardwebhooks" in b]
    (tmp_path / "receiver.mjs").write_text(receiver)
    api, hooks = free_port(), free_port()
    ports = {"127.0.0.1:8642": f"127.0.0.1:{api}", "127.0.0.1:8000": f"127.0.0.1:{hooks}", "PORT=8000": f"PORT={hooks}"}
    [config] = readme_blocks("toml", SECTION)
    for printed, here in ports.items():
        config = config.replace(printed, here)
    (tmp_path / "trial.toml").write_text(config)

    lines = [line.split("  #", 1)[0].strip() for block in readme_blocks("sh", SECTION) for line in block.splitlines()]
    assert lines[0].startswith("python3 -m venv ~/cw"), "the install line comes first"
    command = f"{sys.executable} -m watcher"
    background: list[subprocess.Popen[bytes]] = []
    outputs: dict[str, str] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for line in lines[1:]:
            shown = line
            line = line.replace(BINARY, command).replace(f"{command} simulate", f"{command} simulate --port {api}")
            for printed, here in ports.items():
                line = line.replace(printed, here)
            if line.endswith("&"):
                log = (tmp_path / f"background-{len(background)}.log").open("wb")
                proc = subprocess.Popen(
                    ["bash", "-c", line[:-1]], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
                )
                background.append(proc)
                if "simulate" in line:
                    wait_until(lambda: listening(api), 30, "the simulator")
                elif "receiver.mjs" in line:
                    wait_until(lambda: listening(hooks), 30, "the receiver")
                else:
                    # As a person would: the daemon's first poll (the baseline) before a lead is added.
                    wait_until(lambda: _polled(command, tmp_path, env), 30, "the daemon's first poll")
                continue
            if " events " in line:
                # "within 2 s": the next poll finds the lead and the receiver answers.
                wait_until(lambda line=line: "delivered" in _run(line, tmp_path, env), 30, "the lead delivered")
            outputs[shown] = _run(line, tmp_path, env)
    finally:
        for proc in reversed(background):
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)

    def said(fragment: str) -> str:
        return next(out for shown, out in outputs.items() if fragment in shown)

    assert "accepted: HTTP 204" in said("send-test")
    assert "lead.created" in said("events") and "delivered" in said("events")
    assert "daemon: running" in said("status")
    printed = (tmp_path / "background-1.log").read_text()
    assert printed.count("lead.created") == 2, printed  # the sample from send-test, then the real lead


def _run(line: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
    return result.stdout


def _polled(command: str, cwd: Path, env: dict[str, str]) -> bool:
    result = subprocess.run(
        ["bash", "-c", f"{command} status -c trial.toml --json"], cwd=cwd, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        return False
    streams = json.loads(result.stdout).get("streams", [])
    return any(s["stream"] == "leads.created" and s["polls"] >= 1 for s in streams)
