"""The operator CLI: exit codes, `check --connect`, `status`, `replay`, `--help`, and the README's reference."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import PASSWORD, USERNAME, WEBHOOK_KEY, cli, webhook_sink, write_config
from tests.support.receiver import Receiver
from watcher.cli import build_parser, main
from watcher.config import load_config
from watcher.exitcodes import EXIT_CONFIG
from watcher.simulator import Simulator, SimulatorServer
from watcher.state.migrations import MIGRATIONS
from watcher.state.store import Store

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "invalid_configs"
CORPUS_ENV = {
    "CORPUS_PASSWORD": "corpus-env-password-4d2b",
    "CORPUS_WEBHOOK_SECRET": "whsec_Y29ycHVzLXdlYmhvb2sta2V5LTMyLWJ5dGVzLWxvbmc=",
    "CORPUS_SLACK_URL": "https://hooks.slack.com/services/TCORPUS/BCORPUS/corpus-env-slack",
    "CORPUS_EMPTY": "",
}


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    simulator = Simulator(seed=5, username=USERNAME, password=PASSWORD)
    simulator.seed_data(campaigns=2, leads=6)
    with SimulatorServer(simulator) as server:
        yield simulator, server


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


# --- check ----------------------------------------------------------------------------------


def test_check_valid_config_exits_0(tmp_path: Path) -> None:
    """A valid configuration passes `check` with exit 0 and names its sinks."""
    config = write_config(tmp_path, "http://127.0.0.1:9", [webhook_sink("http://127.0.0.1:9/hook")])
    result = cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "sink crm: webhook" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("case", sorted(CORPUS.glob("*.toml")), ids=lambda p: p.stem)
def test_check_rejects_every_invalid_config_with_78(
    case: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every corpus config exits 78 with one stderr line naming its key path, and no traceback."""
    for name, value in CORPUS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CORPUS_UNSET", raising=False)
    expect = case.read_text().splitlines()[0].removeprefix("# expect:").strip()
    expect = str(case) if expect == "<file>" else expect
    assert main(["check", "-c", str(case)]) == EXIT_CONFIG
    out = capsys.readouterr()
    line = _one_line(out.err)
    assert f"{expect}:" in line, line
    assert out.out == ""


def test_check_exit_78_in_a_real_process(tmp_path: Path) -> None:
    """The installed entry point really exits 78 with one clean line for a syntax error and a missing secret."""
    for case in ("toml_syntax_error.toml", "password_env_unset.toml"):
        result = cli("check", "-c", str(CORPUS / case), env={"CORPUS_PASSWORD": CORPUS_ENV["CORPUS_PASSWORD"]})
        assert result.returncode == 78, result
        _one_line(result.stderr)


def test_check_connect_ok_and_says_which_sinks_it_reached(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer]
) -> None:
    """With good credentials `check --connect` logs in, reads a lead, connects to each enabled sink, exits 0."""
    _simulator, server = sim
    with Receiver() as rx:
        sinks = [
            webhook_sink(rx.url),
            webhook_sink(rx.url.replace("127.0.0.1", "localhost"), name="local"),
            webhook_sink("https://hooks.invalid/x", name="off", enabled=False),
        ]
        result = cli("check", "-c", str(write_config(tmp_path, server.url, sinks)), "--connect")
        assert rx.requests == []
    assert result.returncode == 0, result.stdout + result.stderr
    assert "login: ok; leads readable" in result.stdout
    assert f"sink crm: host 127.0.0.1 port {rx.port}: connected" in result.stdout
    assert f"sink local: host localhost port {rx.port}: connected" in result.stdout
    assert "sink off: disabled in config, not checked" in result.stdout


def test_check_connect_unresolvable_sink_exits_1(tmp_path: Path, sim: tuple[Simulator, SimulatorServer]) -> None:
    """A sink whose host name does not resolve (.invalid never does) fails `check --connect` with exit 1."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink("https://hooks.invalid/convertr", name="crm")])
    result = cli("check", "-c", str(config), "--connect")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "login: ok" in result.stdout
    assert "sink crm: cannot reach host hooks.invalid port 443: host name does not resolve" in result.stdout
    _one_line(result.stderr)


def test_check_connect_wrong_password_exits_78(tmp_path: Path, sim: tuple[Simulator, SimulatorServer]) -> None:
    """A refused login is a configuration error: exit 78, one stderr line, the password nowhere."""
    _simulator, server = sim
    wrong = "not-the-password-7c1"
    config = write_config(tmp_path, server.url, [webhook_sink("http://127.0.0.1:9/hook")], convertr={"password": wrong})
    result = cli("check", "-c", str(config), "--connect")
    assert result.returncode == 78, result.stdout + result.stderr
    assert "login refused" in _one_line(result.stderr)
    assert "login: refused" in result.stdout
    assert "sink crm: cannot reach host 127.0.0.1 port 9: connection refused" in result.stdout
    assert wrong not in result.stdout + result.stderr


def test_run_exits_78_when_the_login_is_refused(tmp_path: Path, sim: tuple[Simulator, SimulatorServer]) -> None:
    """`run` stops by itself with 78 on a refused login, so systemd's RestartPreventExitStatus holds it."""
    _simulator, server = sim
    config = write_config(tmp_path, server.url, convertr={"password": "not-the-password-7c1"})
    result = cli("run", "-c", str(config), timeout=30)
    assert result.returncode == 78, result.stderr[-2000:]
    assert "refused the login" in result.stderr.splitlines()[-1]


# --- status and replay ----------------------------------------------------------------------


def test_status_after_a_known_history(tmp_path: Path, sim: tuple[Simulator, SimulatorServer]) -> None:
    """After one `once` (4 new leads, one good sink, one answering 410) status shows cursors, counts and states."""
    simulator, server = sim
    start = simulator.now().isoformat()
    simulator.advance(5)
    new = simulator.add_leads(4, simulator.campaign_ids()[0])
    with Receiver() as good, Receiver() as gone:
        gone.respond(410)
        config = write_config(
            tmp_path,
            server.url,
            [webhook_sink(good.url, "crm"), webhook_sink(gone.url, "gone")],
            leads={"start": start},
            campaigns={"enabled": True},
        )
        once = cli("once", "-c", str(config))
        assert once.returncode == 1, "a disabled sink's failed delivery makes `once` exit 1"
        assert len(good.requests) == 4 and len(gone.requests) >= 1

    result = cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    streams = {s["stream"]: s for s in status["streams"]}
    assert set(streams) == {"leads.created", "campaigns"}
    for stream in streams.values():
        assert stream["polls"] == 1 and stream["last_error"] is None
        assert stream["last_success_at"] is not None and 0 <= stream["last_poll_age_s"] < 60
    assert streams["leads.created"]["cursor"] is not None
    sinks = {s["sink"]: s for s in status["sinks"]}
    crm, dead = sinks["crm"], sinks["gone"]
    assert (crm["pending"], crm["dead"], crm["delivered"], crm["disabled"]) == (0, 0, 4, False)
    assert crm["last_success_at"] is not None and crm["oldest_pending_age_s"] is None
    assert (dead["pending"], dead["delivered"], dead["disabled"]) == (4, 0, True)
    assert "410" in dead["disabled_reason"] and dead["oldest_pending_age_s"] >= 0
    assert status["tracked_leads"] >= len(new)

    table = cli("status", "-c", str(config))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["STREAM", "CURSOR", "LAST", "POLL", "POLLS", "ERROR"]
    assert any(line.startswith("leads.created ") and "ago" in line for line in lines)
    assert any(line.split()[:3] == ["crm", "0", "0"] and line.endswith(" ok") for line in lines)
    assert any(line.split()[:3] == ["gone", "4", "0"] and line.endswith("disabled") for line in lines)

    replay = cli("replay", "-c", str(config), "--sink", "gone")
    assert replay.returncode == 0 and "re-queued 0 deliveries" in replay.stdout, replay.stderr
    after = {s["sink"]: s for s in json.loads(cli("status", "-c", str(config), "--json").stdout)["sinks"]}
    assert after["gone"]["disabled"] is False and after["gone"]["pending"] == 4


def test_status_without_a_state_file_creates_nothing(tmp_path: Path) -> None:
    """Before the daemon ever ran, status says so, prints empty JSON and does not create the state file."""
    config = write_config(tmp_path, "http://127.0.0.1:9")
    result = cli("status", "-c", str(config), "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"running": False, "role": None, "streams": [], "sinks": [], "tracked_leads": 0}
    assert "no state file" in result.stderr
    assert not (tmp_path / "state.db").exists()


def _state_file(path: Path, *, version: int = len(MIGRATIONS), journal: str = "delete") -> Path:
    """A state file at schema `version` (built with the real migrations) in the given journal mode."""
    # Raw on purpose: the Store only writes current-schema WAL files, these tests need other versions
    # and a rollback-journal file whose every byte status must leave alone.
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute(f"PRAGMA journal_mode = {journal}")
        for script in MIGRATIONS[: min(version, len(MIGRATIONS))]:
            conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_status_never_writes_the_state_file(tmp_path: Path) -> None:
    """status reads a current file without changing a byte of it (not even its journal mode) or adding -wal/-shm."""
    config = write_config(tmp_path, "http://127.0.0.1:9", [webhook_sink("http://127.0.0.1:9/hook")])
    state = _state_file(tmp_path / "state.db")
    before = _digest(state)
    result = cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tracked_leads"] == 0
    assert _digest(state) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("state.db")) == ["state.db"]


@pytest.mark.parametrize("version", [1, len(MIGRATIONS) + 3])
def test_status_refuses_a_file_at_another_schema_version(tmp_path: Path, version: int) -> None:
    """An older file is not migrated (exit 1), a newer one names the schema it needs (78): one line, file untouched."""
    config = write_config(tmp_path, "http://127.0.0.1:9")
    state = _state_file(tmp_path / "state.db", version=version)
    before = _digest(state)
    result = cli("status", "-c", str(config))
    assert result.returncode == (1 if version < len(MIGRATIONS) else EXIT_CONFIG)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    if version < len(MIGRATIONS):
        assert f"schema version {version}, older than this release" in lines[0]
        assert "restart the daemon" in lines[0]
    else:
        assert f"needs a newer convertr-watcher (schema version {version}" in lines[0]
    assert _digest(state) == before
    # Raw on purpose: the Store opens no file at another schema version, which is the point here.
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == version
    conn.close()


def test_status_scrubs_stored_errors(tmp_path: Path) -> None:
    """A stored last_error or disabled reason holding the password, a token or an e-mail address is printed scrubbed."""
    config = write_config(tmp_path, "http://127.0.0.1:9", [webhook_sink("http://127.0.0.1:9/hook")])
    leaky = f"TransientError: login as {USERNAME} with {PASSWORD} failed; Bearer abc.def-123 rejected"
    store = Store.open(tmp_path / "state.db")
    store.poll_failed("leads.created", 1.0, leaky)
    store.disable_sink("crm", 1.0, f"HTTP 410 for ada.lovelace@example.org key {WEBHOOK_KEY}")
    store.close()
    for args in (["--json"], []):
        result = cli("status", "-c", str(config), *args)
        assert result.returncode == 0, result.stderr
        for secret in (PASSWORD, USERNAME, "abc.def-123", "ada.lovelace@example.org", WEBHOOK_KEY):
            assert secret not in result.stdout, (secret, result.stdout)
    status = json.loads(cli("status", "-c", str(config), "--json").stdout)
    assert status["streams"][0]["last_error"].startswith("TransientError: login as [REDACTED] with [REDACTED]")
    assert status["sinks"][0]["disabled_reason"].startswith("HTTP 410 for [REDACTED]")


def test_status_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`status | head` whose reader is gone ends with exit 1 and no traceback."""
    config = write_config(tmp_path, "http://127.0.0.1:9")
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "watcher", "status", "-c", str(config), "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


# --- help and the README --------------------------------------------------------------------


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_command_and_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Each subcommand has a description and `--help` that exits 0; each of its options has help text."""
    commands = _subcommands()
    assert {"run", "once", "check", "status", "replay", "send-test", "simulate", "demo"} <= set(commands)
    for name, parser in commands.items():
        assert parser.description, name
        for action in _options(parser):
            assert action.help and action.help.strip(), f"{name} {action.option_strings[0]} has no help"
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"])
        assert stop.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: convertr-watcher {name}")


def _readme_reference() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Command-line reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `convertr-watcher ([a-z-]+)", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_readme_cli_reference_lists_every_command_and_option() -> None:
    """README's "Command-line reference" has a row for every subcommand, naming each of its options."""
    rows = _readme_reference()
    missing = sorted(set(_subcommands()) - set(rows))
    assert not missing, f"README's Command-line reference lacks {missing}"
    for name, parser in _subcommands().items():
        for action in _options(parser):
            named = any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", rows[name]) for o in action.option_strings)
            assert named, f"README's row for `{name}` does not mention {'/'.join(action.option_strings)}"


# --- docs/operations.md ---------------------------------------------------------------------

OPERATIONS = ROOT / "docs" / "operations.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", OPERATIONS.read_text(), re.S)


def test_operations_guide_commands_parse() -> None:
    """Every convertr-watcher command line in docs/operations.md is accepted by the real parser."""
    commands = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if "bin/convertr-watcher " in line:
                words = shlex.split(line.split("  #", 1)[0].replace("$C", "/etc/convertr-watcher/config.toml"))
                commands.append(words[words.index(next(w for w in words if w.endswith("bin/convertr-watcher"))) + 1 :])
    assert len(commands) >= 10
    for argv in commands:
        if argv == ["--version"]:
            continue
        args = build_parser().parse_args(argv)
        assert callable(args.func), argv


def test_operations_guide_config_loads(tmp_path: Path) -> None:
    """The guide's example configuration is valid once its credential files exist."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "convertr-password").write_text("s3cret-from-file\n")
    (creds / "crm-webhook-secret").write_text(WEBHOOK_KEY + "\n")
    (text,) = [b for b in _blocks("toml") if "[convertr]" in b]
    text = text.replace("/run/credentials/convertr-watcher.service", str(creds))
    text = text.replace("/var/lib/convertr-watcher/state.db", str(tmp_path / "state.db"))
    (tmp_path / "config.toml").write_text(text)
    config = load_config(tmp_path / "config.toml")
    assert config.convertr.password == "s3cret-from-file"
    assert config.sink("crm").secrets == (WEBHOOK_KEY,)
    assert config.metrics.listen == ("127.0.0.1", 9464)
