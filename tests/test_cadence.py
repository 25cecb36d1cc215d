"""The daemon's own job cadence: boundaries on the monotonic clock, one run at a time, an overrun said once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, write_config
from watcher.cadence import next_start, overrun


@pytest.mark.parametrize(
    ("started", "finished", "interval", "expected"),
    [
        (100.0, 100.5, 60.0, 160.0),  # within its interval: the next boundary
        (100.0, 161.0, 60.0, 220.0),  # one boundary covered: skipped, the one after
        (100.0, 250.0, 60.0, 280.0),  # two covered
        (100.0, 160.0, 60.0, 220.0),  # ended exactly on a boundary: that one was covered
        (100.0, 100.0, 0.0, 100.0),
    ],
)
def test_next_start_is_the_first_boundary_after_the_run(
    started: float, finished: float, interval: float, expected: float
) -> None:
    assert next_start(started, finished, interval) == expected


def test_overrun_is_the_time_past_the_interval() -> None:
    assert overrun(0.0, 30.0, 60.0) == 0.0
    assert overrun(0.0, 75.0, 60.0) == 15.0


def test_a_poll_longer_than_its_interval_logs_one_line_per_overrun(tmp_path: Path, sim) -> None:
    """Polls taking ~2.5 intervals: one warning per overrun poll saying how long it took, not one a tick."""
    simulator, server = sim
    config = write_config(tmp_path, server.url, leads={"interval": 1})
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        simulator.faults.latency = 1.2  # a walk reads a page and checks the boundary: two requests
        daemon.wait_polls(2, timeout=40)
        simulator.faults.latency = 0.0
        assert daemon.stop() == 0
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    assert not [e for e in lines if "maximum number of running instances" in str(e.get("event"))]
    overran = [e for e in lines if str(e.get("event")).startswith("run overran its interval")]
    polls = [e for e in lines if e.get("event") == "poll"]
    assert overran, daemon.log()[-2000:]
    assert len(overran) <= len(polls)
    assert all(e["job"] == "leads" and float(e["took"]) > 1.0 for e in overran)
