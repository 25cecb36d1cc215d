"""What the README's snippets need to run: their text, the npm packages they import, free loopback ports."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
README = ROOT / "README.md"


def readme_blocks(language: str, section: str | None = None) -> list[str]:
    """The README's fenced blocks in `language`, of one `## section` or of the whole file."""
    text = README.read_text()
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def tool(name: str, *, optional: bool = False) -> str:
    """The path of a toolchain command. Node and npm are on every machine the project runs on, so
    their absence fails; Go is not: a developer's machine without it skips what needs it, while CI
    (`make test` installs golang-go there) fails."""
    found = shutil.which(name)
    if found is None:
        if optional and os.environ.get("CI") != "true":
            pytest.skip(f"no {name} toolchain on this machine")
        pytest.fail(f"{name} is not installed")
    return found


def npm_install(folder: Path) -> None:
    """Install tests/js's npm packages (by its lock file) into `folder`, as a receiver's project has them."""
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(ROOT / "tests" / "js" / name, folder / name)
    installed = subprocess.run(
        [tool("npm"), "ci", "--no-audit", "--no-fund"], cwd=folder, capture_output=True, text=True, timeout=300
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr


def free_port() -> int:
    """A loopback port free right now, for a server the test starts as a process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Whether something accepts connections on the loopback port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
