from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from watcher.config import ConvertrConfig

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
MAX_EXPOSURE = 1.2
# (shipped file, the unit name it is checked under: templates need an instance)
UNITS = [
    ("convertr-watcher.service", "convertr-watcher.service"),
    ("convertr-watcher@.service", "convertr-watcher@acme.service"),
]
BINARY = "/opt/convertr-watcher/bin/convertr-watcher"


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path is not None, "systemd-analyze is required for these tests (apt-get install systemd)"
    return path


def checkable_copy(shipped: str, name: str, tmp_path: Path) -> Path:
    """The unit under its instance name, with ExecStart pointing at a binary that exists here."""
    text = (SYSTEMD_DIR / shipped).read_text()
    assert f"ExecStart={BINARY} " in text
    copy = tmp_path / name
    copy.write_text(text.replace(f"ExecStart={BINARY} ", f"ExecStart={sys.executable} "))
    # The credentials drop-in beside it, where systemd reads drop-ins of a unit in that folder.
    dropin = tmp_path / f"{shipped}.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "credentials.conf").write_text((SYSTEMD_DIR / f"{shipped}.d" / "credentials.conf").read_text())
    return copy


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze(), "--no-pager", *args], capture_output=True, text=True, timeout=60, check=False)


def service_section(shipped: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    # Repeated keys (LoadCredential=, Environment=) are legal in units; keep the last for lookups.
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD_DIR / shipped).read_text())
    return parser


@pytest.mark.parametrize(("shipped", "name"), UNITS)
def test_security_exposure_is_at_most_1_2(shipped: str, name: str, tmp_path: Path) -> None:
    """`systemd-analyze security --offline` rates each unit 1.2 or better."""
    unit = checkable_copy(shipped, name, tmp_path)
    result = run("security", "--offline=true", str(unit))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output


@pytest.mark.parametrize(("shipped", "name"), UNITS)
def test_verify_reports_nothing(shipped: str, name: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single remark."""
    unit = checkable_copy(shipped, name, tmp_path)
    result = run("verify", "--man=no", str(unit))
    output = (result.stdout + result.stderr).strip()
    about_us = [line for line in output.splitlines() if "convertr-watcher" in line or str(tmp_path) in line]
    assert about_us == [], output
    assert result.returncode == 0, output


@pytest.mark.parametrize(
    ("shipped", "config", "state", "creds"),
    [
        (
            "convertr-watcher.service",
            "/etc/convertr-watcher/config.toml",
            "convertr-watcher",
            "/run/credentials/convertr-watcher.service/",
        ),
        (
            "convertr-watcher@.service",
            "/etc/convertr-watcher/%i.toml",
            "convertr-watcher/%i",
            "/run/credentials/convertr-watcher@acme.service/",
        ),
    ],
)
def test_unit_runs_the_daemon_as_a_watched_notify_service(shipped: str, config: str, state: str, creds: str) -> None:
    """The daemon's contract with systemd: notify, watchdog, restarts, exit 78, directories, secrets."""
    service = service_section(shipped)["Service"]
    assert service["ExecStart"] == f"{BINARY} run -c {config}"
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID", "`systemctl reload` sends the daemon a SIGHUP"
    assert service["WatchdogSec"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "78"
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == state
    assert service["ConfigurationDirectory"] == "convertr-watcher"
    assert service["TimeoutStopSec"]
    text = (SYSTEMD_DIR / shipped).read_text()
    assert "Environment=PYTHONUNBUFFERED=1" in text
    # Secrets are listed in a drop-in (`systemctl edit`), so copying a new release's unit over the
    # old one never drops the operator's list.
    assert not re.search(r"^LoadCredential=", text, re.M), "credentials belong in the drop-in"
    dropin = (SYSTEMD_DIR / f"{shipped}.d" / "credentials.conf").read_text()
    assert dropin.splitlines()[dropin.splitlines().index("[Service]") :][0] == "[Service]"
    credentials = re.findall(r"^LoadCredential=([\w-]+):", dropin, re.M)
    assert credentials, "secrets come in through LoadCredential="
    for credential in credentials:
        assert f"{creds}{credential}" in text, f"the header must document where {credential} appears"
    assert "systemctl edit" in text and "systemctl edit" in dropin
    assert "0644" in text, "the header says what mode the DynamicUser= service needs on its config"


@pytest.mark.parametrize("shipped", [shipped for shipped, _ in UNITS])
def test_memory_is_capped_above_what_the_daemon_may_hold(shipped: str) -> None:
    """MemoryMax= bounds the service, with room for max_in_flight answers at the default max_response_bytes."""
    service = service_section(shipped)["Service"]
    match = re.fullmatch(r"(\d+)M", service["MemoryMax"])
    assert match is not None, service["MemoryMax"]
    ceiling = int(match.group(1)) * 1024 * 1024
    defaults = ConvertrConfig(base_url="https://acme.cvtr.io", username="u", password="p")
    assert ceiling >= defaults.max_in_flight * defaults.max_response_bytes + 128 * 1024 * 1024
    assert service["MemorySwapMax"] == "0"
