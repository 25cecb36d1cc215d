"""What the running daemon tells `status` about its configuration: when it was loaded, and which one.

A small JSON file beside the state file (`<state>.run.json`, mode 0600), rewritten whole on start
and on each SIGHUP. It lives outside the SQLite file so `status` can read it without touching the
database's schema, and a reload never competes with deliveries for the database's write lock.
The fingerprint hashes the file's bytes and the secrets it resolved (from `_env`/`_file` too), so
rotating a secret file changes it as well; only the hash is written, never a value. The file's
own digest is written too, so a command that reads no secrets (`status` with the service stopped)
can still tell whether the file on disk is the one the daemon loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from watcher.config import Config


def info_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + ".run.json")


def config_fingerprint(config: Config) -> str:
    """A short hash of the configuration as loaded: the file's bytes and every secret it resolved.

    The bytes are those the load read (`source_digest`), not the file as it is now: after a refused
    reload the file on disk is the broken one, while the daemon still runs what it loaded before.
    """
    digest = hashlib.sha256(config.source_digest.encode())
    for value in config.secret_values():
        digest.update(b"\x1f" + value.encode())
    return digest.hexdigest()[:12]


def write_info(state_path: Path, info: dict[str, Any]) -> None:
    """Replace the file atomically (a reader never sees half of it); failures are the caller's to log."""
    target = info_path(state_path)
    temp = target.with_name(target.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    os.replace(temp, target)


def read_info(state_path: Path) -> dict[str, Any] | None:
    """The daemon's last written info, or None when there is none (or it cannot be read)."""
    try:
        data = json.loads(info_path(state_path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
