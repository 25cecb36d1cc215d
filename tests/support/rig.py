"""The real poller, store and client in-process against the simulator on loopback, one poll at a time.

The simulator's clock is a `FakeClock` that moves only when told, so every step is deterministic;
the daemon side uses the same clock (it is told the time like any process on that host). The
outbox is read through the `Store` API. Nothing is delivered: these tests are about detection.
The state is an SQLite file in the folder, or a schema of a PostgreSQL database (`state`: the
[state] table, `{"url": ..., "schema": ...}`), backed up and restored with pg_dump and pg_restore.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.support.daemon import PASSWORD, USERNAME, write_config
from watcher.clock import FakeClock
from watcher.config import Config, load_config
from watcher.convertr import ConvertrClient
from watcher.events import loads
from watcher.poller import Poller
from watcher.simulator import Simulator, SimulatorServer
from watcher.simulator.filters import LeadQuery, Page
from watcher.state.store import Store, open_store

# Never called: the rig runs no dispatcher, a sink only has to exist for events to be kept.
SINK = {"name": "crm", "type": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "whsec_" + "A" * 32}


class HookedSimulator(Simulator):
    """A simulator that runs test code right after serving a chosen page of a walk, so writes land
    between pages. Hooks are keyed (walk, page number, page size): walk is "created" or "updated"
    (lead walks by their filter, "other" for the rest) or "campaigns"; a size of 0 matches any size."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hooks: dict[tuple[str, int, int], Callable[[], object]] = {}
        # (lead pages of `countdown_size` rows still to serve, then this runs): lands in whichever
        # walk is reading by then; other sizes (start-up checks, position checks) do not count.
        self.countdown: tuple[int, Callable[[], object]] | None = None
        self.countdown_size = 0

    def lead_page(self, query: LeadQuery, page: Page) -> tuple[int, list[str]]:
        served = super().lead_page(query, page)
        if self.countdown is not None and page.limit == self.countdown_size:
            left, action = self.countdown
            self.countdown = (left - 1, action) if left > 1 else None
            if left <= 1:
                action()
        walk = "updated" if "updated_wall" in query.where else "created" if "created_wall" in query.where else "other"
        hook = self.hooks.pop((walk, page.number, page.limit), None) or self.hooks.pop((walk, page.number, 0), None)
        if hook is not None:
            hook()
        return served

    def campaign_page(self, params: Any, page: Page, updated_filter: bool) -> tuple[int, list[dict[str, Any]]]:
        served = super().campaign_page(params, page, updated_filter)
        hook = self.hooks.pop(("campaigns", page.number, page.limit), None) or self.hooks.pop(
            ("campaigns", page.number, 0), None
        )
        if hook is not None:
            hook()
        return served


class Rig:
    """A simulator, a state file and a poller that can be restarted, crashed and reconfigured."""

    def __init__(self, folder: Path, sim: Simulator, url: str, state: Mapping[str, Any] | None = None) -> None:
        self.folder = folder
        self.state = state
        self.sim = sim
        self.url = url
        # The host's clock; the server's is this plus `sim.offset` (a skew between the two).
        assert isinstance(sim.clock, FakeClock), "the rig needs a simulator on a FakeClock"
        self.clock = sim.clock
        self.loop = asyncio.new_event_loop()
        self.config: Config | None = None
        self.store: Store | None = None
        self.client: ConvertrClient | None = None
        self.poller: Poller | None = None

    # --- configuration and process life ---------------------------------------------------------

    def configure(self, *, items_per_page: int = 4, convertr: Mapping[str, Any] | None = None, **leads: Any) -> Config:
        """Write the config (a restart applies it)."""
        values = {"updates": True, "lookback": "30s", **leads}
        path = write_config(
            self.folder,
            self.url,
            [SINK],
            convertr={"items_per_page": items_per_page, **(convertr or {})},
            leads=values,
            state=self.state,
        )
        self.config = load_config(path)
        return self.config

    def start(self) -> Poller:
        assert self.config is not None, "configure() first"
        self.store = open_store(self.config.state)
        self.client = ConvertrClient(self.config.convertr, clock=self.clock)
        self.poller = Poller(self.config, self.client, self.store, self.clock)
        return self.poller

    def stop(self) -> None:
        if self.client is not None:
            self.loop.run_until_complete(self.client.aclose())
        if self.store is not None:
            self.store.close()
        self.store = self.client = self.poller = None

    def ensure(self) -> Store:
        """The open state file, starting the daemon side if it is stopped."""
        if self.store is None:
            self.start()
        assert self.store is not None
        return self.store

    def restart(self) -> Poller:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self.loop.close()

    def backup(self, name: str = "backup.db") -> Path:
        """A copy of the state file as an operator would take it (the daemon stopped)."""
        assert self.config is not None
        self.stop()
        target = self.folder / name
        pg = self.config.state.postgres
        if pg is None:
            shutil.copy(self.config.state.path, target)
        else:
            _run("pg_dump", "--format=custom", f"--schema={pg.schema}", f"--file={target}", pg.url)
        self.start()
        return target

    def restore(self, backup: Path) -> None:
        assert self.config is not None
        self.stop()
        pg = self.config.state.postgres
        if pg is not None:
            import psycopg

            with psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {pg.schema} CASCADE")
            _run("pg_restore", f"--dbname={pg.url}", str(backup))
            self.start()
            return
        for suffix in ("-wal", "-shm"):
            Path(str(self.config.state.path) + suffix).unlink(missing_ok=True)
        shutil.copy(backup, self.config.state.path)
        self.start()

    # --- steps ----------------------------------------------------------------------------------

    def poll(self, *, campaigns: bool = False) -> None:
        poller = self.poller or self.start()
        self.loop.run_until_complete(poller.poll_leads())
        if campaigns:
            self.loop.run_until_complete(poller.poll_campaigns())

    def poll_campaigns(self) -> None:
        poller = self.poller or self.start()
        self.loop.run_until_complete(poller.poll_campaigns())

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # --- what the outbox holds ----------------------------------------------------------------

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        """Every event in the outbox, oldest first: id, type, resource and the body's data."""
        assert self.store is not None
        out = []
        for row in self.store.events():
            if type_ is None or row["type"] == type_:
                out.append({"id": row["id"], "type": row["type"], "resource": row["resource"], **loads(row["payload"])})
        return out

    def created(self) -> Counter[int]:
        return Counter(e["data"]["lead"]["id"] for e in self.events("lead.created"))

    def updates(self, lead_id: int | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events("lead.updated") if lead_id is None or e["data"]["lead"]["id"] == lead_id]


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{command[0]}: {done.stderr}"


def make_rig(
    folder: Path,
    stack: Any,
    *,
    state: Mapping[str, Any] | None = None,
    zone: str = "Europe/London",
    start: float,
    seed: int = 11,
    leads: int = 0,
    skew: float = 0.0,
) -> Rig:
    """`start` is the host's time; the server's clock runs `skew` seconds ahead of it."""
    sim = HookedSimulator(seed=seed, username=USERNAME, password=PASSWORD, timezone=zone, clock=FakeClock(start))
    sim.offset = skew
    sim.seed_data(campaigns=2, leads=leads)
    server = stack.enter_context(SimulatorServer(sim))
    rig = Rig(folder, sim, server.url, state)
    stack.callback(rig.close)
    return rig
