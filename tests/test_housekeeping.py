"""Housekeeping runs on the event loop: pruning never shares the connection with a page commit or an outcome."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import structlog

from tests.conftest import serving
from tests.support.daemon import webhook_sink, write_config
from tests.support.receiver import Receiver
from tests.support.state import reading
from watcher.clock import SystemClock
from watcher.config import load_config
from watcher.daemon import Daemon
from watcher.events import Event
from watcher.notify import Notifier
from watcher.records import PageCommit
from watcher.runtime import runtime
from watcher.state.store import Store

DAY = 86_400.0
SEEDED_DEAD = 5_000  # enough rows that each prune holds its transaction for a noticeable time


def _seed_dead_rows(path: Path) -> None:
    """Dead deliveries that prune keeps but must scan every time (its events-without-deliveries pass)."""
    now = time.time()
    store = Store.open(path)
    try:
        seeds = [Event(f"seed-{i}", "lead.created", "t", {}, f"seed:{i}") for i in range(SEEDED_DEAD)]
        # A stream of their own: the seeds must not leave a cursor behind for the real lead walk.
        store.commit_page(PageCommit("seed", now - 60, events=[(e, ["crm"]) for e in seeds]))
        # Queued a minute ago for a sink that was off, past a 1 s max_age: dead now, and kept for the
        # test's length by the default 30-day dead_retention, so every housekeeping pass scans them.
        aged = store.age_out(now, dead_retention=DAY, configured={"crm": 1.0}, stopped=["crm"])
        assert aged["expired"] == SEEDED_DEAD
    finally:
        store.close()


def test_housekeeping_against_a_busy_poller(tmp_path: Path, receiver: Receiver) -> None:
    """Prune every 20 ms while leads stream in: no nested transaction, no lost outcome, every event sent once."""
    with serving(seed=5, campaigns=2, leads=5) as (simulator, server):
        config_path = write_config(
            tmp_path,
            server.url,
            [webhook_sink(receiver.url, retry_schedule=["200ms"] * 10)],
            leads={"interval": 1},
        )
        # Delivered rows and attempts are pruned almost at once, so every run deletes something.
        retention = 'path = "state.db"\ndelivered_retention = "1ms"\nattempt_log_retention = "1ms"'
        config_path.write_text(config_path.read_text().replace('path = "state.db"', retention))
        config = load_config(config_path)
        _seed_dead_rows(config.state.path)
        campaign = simulator.campaign_ids()[0]
        added: list[int] = []

        async def scenario() -> int:
            async with runtime(config, SystemClock()) as rt:
                task = asyncio.create_task(Daemon(rt, Notifier(None), housekeeping_interval=0.02).run())
                async with asyncio.timeout(60):
                    # Leads created before the first walk ends are its baseline, never announced.
                    while not ((c := rt.store.cursor("leads.created")) and c.polls):
                        await asyncio.sleep(0.05)
                    for _ in range(8):
                        added.extend(simulator.add_leads(5, campaign))
                        await asyncio.sleep(0.5)  # pacing the generator, not waiting for a result
                    while not set(added) <= _delivered_leads(receiver):
                        await asyncio.sleep(0.05)
                rt.stopping.set()
                return await task

        with structlog.testing.capture_logs() as logs:
            code = asyncio.run(scenario())

    assert code == 0
    with reading(config.state.path) as store:
        assert store.sink_state("crm").dead == SEEDED_DEAD, "the seeds went early: later prunes had nothing to scan"
    messages = [f"{e.get('event')} {e.get('error', '')}" for e in logs]
    assert not [m for m in messages if "transaction" in m], messages
    assert not [m for m in messages if "cannot record" in m or "fatal" in m or "housekeeping failed" in m]
    assert sum(1 for e in logs if e.get("event") == "pruned") >= 3, "housekeeping ran beside the polls"
    ids = Counter(r.headers["webhook-id"] for r in receiver.requests if r.method == "POST" and r.status == 200)
    assert ids and max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]


def _delivered_leads(receiver: Receiver) -> set[int]:
    return {
        r.json()["data"]["lead"]["id"]
        for r in receiver.requests
        if r.method == "POST" and r.status == 200 and r.json()["type"] == "lead.created"
    }
