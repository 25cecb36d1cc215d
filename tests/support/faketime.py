"""libfaketime (Debian's `faketime` package) for a daemon or CLI subprocess: its wall clock is the
real one plus an offset read from a file on every call; its monotonic clock is left real."""

from __future__ import annotations

import glob
from pathlib import Path


def faketime_env(offset_file: Path) -> dict[str, str]:
    """The environment that runs a subprocess at the offset `offset_file` holds ("+7200", "-3600")."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    assert found, "libfaketime is missing: `apt-get install faketime` (make test installs it when run as root)"
    return {
        "LD_PRELOAD": found[0],
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",  # read the file on every call: a rewrite is a step at once
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
