"""A backlog drain stays far under journald's 10 000 lines per 30 s: successes are counted, failures each said."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

from tests.support.daemon import Daemon, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver
from watcher.deliverylog import DeliveryTally

BACKLOG = 1000
FAILURES = 5


def test_tally_says_one_summary_per_sink_per_interval() -> None:
    tally = DeliveryTally(every=10.0)
    assert not tally.due(100.0)
    tally.add("crm", "lead.created", 0.02, 100.0)
    tally.add("crm", "lead.updated", 0.04, 101.0)
    tally.add("bus", "lead.created", 0.01, 102.0)
    assert not tally.due(109.9)
    assert tally.due(110.0)
    lines = tally.take(110.0)
    assert [line["sink"] for line in lines] == ["bus", "crm"]
    assert lines[1] == {
        "sink": "crm",
        "delivered": 2,
        "types": {"lead.created": 1, "lead.updated": 1},
        "seconds": 10.0,
        "mean_duration": 0.03,
        "max_duration": 0.04,
    }
    assert tally.take(111.0) == [] and not tally.due(500.0)


def _lines(log: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_a_backlog_drain_logs_counts_not_a_line_per_delivery(tmp_path: Path, sim, receiver: Receiver) -> None:
    """1 000 backfilled leads: every success counted in per-sink summaries, every failure on its own line."""
    simulator, server = sim
    start = (simulator.now() - timedelta(minutes=1)).isoformat()
    simulator.add_leads(BACKLOG, simulator.campaign_ids()[0])
    receiver.respond_sequence([500] * FAILURES)
    config = write_config(
        tmp_path, server.url, [webhook_sink(receiver.url, retry_schedule=["200ms"] * 3)], leads={"start": start}
    )
    with Daemon(config) as daemon:
        accepted = lambda: sum(1 for r in receiver.requests if r.status == 200)  # noqa: E731
        wait_until(lambda: accepted() >= BACKLOG, 120, f"{BACKLOG} deliveries")
        per_window = Counter(
            int(datetime.fromisoformat(str(e["timestamp"]).replace("Z", "+00:00")).timestamp() // 30)
            for e in _lines(daemon.log())
        )
        # journald's default keeps 10 000 lines per 30 s; polls every second and the summaries are far below it.
        assert max(per_window.values()) < 200, per_window
        assert daemon.stop() == 0  # a stop says the counts not yet said
    lines = _lines(daemon.log())
    summaries = [e for e in lines if e.get("event") == "deliveries"]
    assert sum(int(str(e["delivered"])) for e in summaries) == accepted()
    assert len([e for e in lines if e.get("event") == "delivery failed"]) == FAILURES
    assert not [e for e in lines if e.get("event") == "delivered"], "single deliveries are debug lines"
