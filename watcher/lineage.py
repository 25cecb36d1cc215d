"""Evidence beside the state file that it has history, so a state that lost it is refused, not re-baselined.

A state file that lost its history looks new: its -wal deleted after a crash (everything since
the last checkpoint lived there), a backup taken of the main file alone, the wrong file restored.
Opened as it is, the daemon would take a fresh baseline, and every change since, pending events
included, would never be announced. So once a poll has committed a cursor, a marker
`<state>.history` (mode 0600) is written beside the file, and `run` and `once` refuse a state
file without a cursor while the marker says there were some. `--start-over` says a fresh
baseline is meant.

A restored backup of the same state keeps its cursors and passes: it re-reads from its older
cursors, and the deterministic event ids make every change it finds again the same event.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from watcher.clock import rfc3339
from watcher.errors import StateLost
from watcher.state.store import Store

SUFFIX = ".history"


def marker_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + SUFFIX)


def marked_since(state_path: Path) -> str | None:
    """When the marker says the state first had history; None without a marker."""
    try:
        data = json.loads(marker_path(state_path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "an unknown time"  # present but unreadable: still evidence
    since = data.get("since") if isinstance(data, dict) else None
    return str(since) if since else "an unknown time"


def mark(state_path: Path, now: float) -> None:
    """Record that the state now has history (once; an existing marker keeps its first time)."""
    target = marker_path(state_path)
    if target.exists():
        return
    temp = target.with_name(target.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"since": rfc3339(now), "state": str(state_path)}, fh)
        fh.flush()
        os.fsync(fh.fileno())
        if os.geteuid() == 0:
            # Written by root (`sudo ... once`): the service's user must still be able to read it.
            folder = os.stat(state_path.parent)
            os.fchown(fh.fileno(), folder.st_uid, folder.st_gid)
    os.replace(temp, target)


def lost_history(state_path: Path, start_with: str) -> str | None:
    """Why the state file must not be used as it is, or None. `start_with` is the command to start over."""
    since = marked_since(state_path)
    if since is None or Store.history(state_path) > 0:
        return None
    return (
        f"state file {state_path} has lost its history: {marker_path(state_path).name} beside it says it has "
        f"polled since {since}, but it holds no cursor (its -wal deleted after a crash, or a backup of the "
        "main file alone). Restore a backup of the state (docs/operations.md), or take a fresh baseline that "
        f"never announces what changed meanwhile: `{start_with} --start-over`"
    )


def refuse_lost_history(state_path: Path, start_with: str) -> None:
    """StateLost when the state file lost its history (see module docstring)."""
    problem = lost_history(state_path, start_with)
    if problem is not None:
        raise StateLost(problem)
