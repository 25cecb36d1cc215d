"""Personal data has a lifetime: queues nothing will send age out by max_age and [state] dead_retention."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

from tests.support.daemon import cli, webhook_sink, write_config
from tests.support.faketime import faketime_env
from tests.support.receiver import Receiver
from tests.support.state import reading


def _rows(db: Path) -> dict[tuple[str, str], int]:
    """How many deliveries each (sink, status) holds."""
    with reading(db) as store:
        return dict(Counter((d["sink"], d["status"]) for d in store.deliveries()))


def _events(db: Path) -> int:
    """How many event payloads the file keeps."""
    with reading(db) as store:
        return len(store.events())


def _newest(db: Path, column: str = "created_at", status: str = "pending") -> float:
    """The latest queue time (or, with next_attempt_at of dead rows, death time) in Unix seconds."""
    with reading(db) as store:
        return max(float(d[column]) for d in store.deliveries() if d["status"] == status)


def _aged(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if '"personal data aged out"' in line]


def _at(offset_file: Path, when: float) -> dict[str, str]:
    """The environment that runs a `once` whose wall clock starts at `when` (Unix seconds)."""
    offset_file.write_text(f"{math.ceil(when - time.time()):+d}\n")
    return faketime_env(offset_file)


def test_queues_of_disabled_and_removed_sinks_age_out(tmp_path: Path, sim) -> None:
    """A 410-disabled sink's queue dies after max_age, dead rows and a removed sink's queue go after dead_retention.

    The later runs read a wall clock set ahead (libfaketime) rather than waiting it out: each lands
    well inside the window it tests (after max_age, 60 s before dead_retention; then past it) however
    slowly a loaded machine starts the process.
    """
    _simulator, server = sim
    offset = tmp_path / "faketime"
    with Receiver() as gone, Receiver() as down:
        gone.respond(410)  # the sink is disabled; its events stay queued
        down.respond(500)
        sinks = [
            webhook_sink(gone.url, name="gone", max_age="2s"),
            webhook_sink(down.url, name="old", retry_schedule=["1h"]),
        ]
        config = write_config(tmp_path, server.url, sinks, leads={"start": "2000-01-01T00:00:00Z"})
        text = config.read_text().replace('path = "state.db"', 'path = "state.db"\ndead_retention = "60s"')
        config.write_text(text)
        db = tmp_path / "state.db"
        assert cli("once", "-c", str(config)).returncode == 1  # both sinks failed
        queued = _rows(db)
        assert queued[("gone", "pending")] > 0 and queued[("old", "pending")] == queued[("gone", "pending")]
        events = _events(db)
        queued_at = _newest(db)

        # Sink "old" leaves the configuration; "gone" stays, disabled, past its max_age.
        config.write_text(text[: text.index("[[sinks]]")] + text[text.index("[[sinks]]") :].split("\n\n[[sinks]]")[0])
        second = cli("once", "-c", str(config), env=_at(offset, queued_at + 10))  # max_age 2s is past
        assert _rows(db) == {
            ("gone", "dead"): queued[("gone", "pending")],
            ("old", "pending"): queued[("old", "pending")],
        }
        assert _aged(second.stdout)[0]["expired"] == queued[("gone", "pending")]

        died_at = _newest(db, "next_attempt_at", "dead")
        third = cli("once", "-c", str(config), env=_at(offset, max(queued_at, died_at) + 65))  # and dead_retention
        assert _rows(db) == {}, "dead rows and the removed sink's queue are still there"
        assert _events(db) == 0 < events, "payloads outlived every delivery"
        aged = _aged(third.stdout)[0]
        assert aged["dead"] == queued[("gone", "pending")] and aged["removed_sinks"] == queued[("old", "pending")]
        assert "@" not in json.dumps(aged), "the log line carries counts only"
