"""A plain install works: the wheel, in a fresh venv without extras, runs the demo to 0 missing.

The development venv has every extra, so only a venv of its own shows what `pip install` gives
an operator. One venv for the whole session: building and installing take most of this test's time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a wheel is built from: the package and what pyproject.toml reads (the README is its description).
SOURCES = ("pyproject.toml", "README.md", "watcher")


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    # Nothing of the development venv may leak in: no PYTHONPATH, no VIRTUAL_ENV, and a working
    # folder without a `watcher/` package that `python -m watcher` would import first.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def plain_install() -> Iterator[Path]:
    """The bin folder of a fresh venv holding the project's wheel, installed without extras."""
    folder = Path(tempfile.mkdtemp(prefix="watcher-install-"))
    try:
        source = folder / "source"
        source.mkdir()
        for name in SOURCES:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, source / name)
        # A copy, so the build's egg-info and build/ folders never land in the working tree.
        built = _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(folder / "dist"), str(source)],
            folder,
            300,
        )
        assert built.returncode == 0, built.stderr[-3000:]
        (folder / "build.log").write_text(built.stdout + built.stderr)
        wheel = next((folder / "dist").glob("convertr_watcher-*.whl"))
        made = _run([sys.executable, "-m", "venv", str(folder / "venv")], folder, 120)
        assert made.returncode == 0, made.stderr[-3000:]
        bin_dir = folder / "venv" / "bin"
        # Runtime dependencies come from the package index (pip's cache makes a second run quick).
        installed = _run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", str(wheel)], folder, 300)
        assert installed.returncode == 0, installed.stderr[-3000:]
        yield bin_dir
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_plain_install_has_no_test_extras(plain_install: Path) -> None:
    """The fresh venv really lacks the test extra, so the demo below proves the runtime dependencies suffice."""
    probe = _run([str(plain_install / "python"), "-c", "import pytest"], plain_install, 60)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr


def test_demo_from_a_plain_install_misses_nothing(plain_install: Path) -> None:
    """The installed `convertr-watcher demo --duration 5` exits 0 with every event type and missing 0."""
    result = _run([str(plain_install / "convertr-watcher"), "demo", "--duration", "5"], plain_install, 110)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    assert re.search(r"^missing:\s+0$", result.stdout, re.M), output[-4000:]
    for kind in ("lead.created", "lead.updated", "campaign.created", "campaign.status_changed"):
        row = re.search(rf"^{re.escape(kind)}\s+(\d+)\s+(\d+)\s+(\d+)$", result.stdout, re.M)
        assert row, f"no summary row for {kind}:\n{result.stdout[-3000:]}"
        made, received, missing = map(int, row.groups())
        assert made >= 1 and received >= made and missing == 0, row.group(0)


def test_the_build_draws_no_deprecation_warning(plain_install: Path) -> None:
    """Building the wheel says nothing about a deprecated pyproject.toml (the license as a table did)."""
    log = (plain_install.parent.parent / "build.log").read_text()
    assert "deprecated" not in log.lower(), log[-3000:]
