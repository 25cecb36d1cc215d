"""The wall clock's frame across a stop, so a step made while the daemon was stopped is moved too.

`SteppedClock` notices a step while the daemon runs, by comparing the wall clock with the time
since boot. A step while it is stopped (an NTP step as the host settles, a VM restored) left
retry times and failure streaks in the old frame: after a step back of an hour, a retry due in
seconds waited the hour. So the offset between the two clocks is kept beside the state file
(`<state>.clock.json`, mode 0600) with the boot it belongs to; at start, the same boot with
another offset is a step made while stopped. Across a reboot the boot clock starts again and
nothing can be told: the frame is then only written afresh.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from watcher.clock import wall_step

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def frame_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + ".clock.json")


def boot_id() -> str | None:
    """This boot's identity (Linux); None where there is none, and then nothing is compared."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def step_while_stopped(state_path: Path, boot: str | None, offset: float) -> float:
    """How far the wall clock stepped since the frame was last kept in this boot; 0.0 when unknown."""
    if boot is None:
        return 0.0
    try:
        data = json.loads(frame_path(state_path).read_text())
    except (OSError, ValueError):
        return 0.0
    before = data.get("offset") if isinstance(data, dict) and data.get("boot") == boot else None
    if not isinstance(before, int | float) or isinstance(before, bool):
        return 0.0
    return wall_step(float(before), offset)


def keep(state_path: Path, boot: str | None, offset: float) -> None:
    """Write the frame atomically; raises OSError for the caller to log."""
    if boot is None:
        return
    target = frame_path(state_path)
    temp = target.with_name(target.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"boot": boot, "offset": offset}, fh)
    os.replace(temp, target)
