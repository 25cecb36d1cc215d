"""The measurements. Each compares the daemon's own path with a plain baseline in the same run."""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx

from bench.procs import PASSWORD, SECRET, USERNAME, child_env, receiver, simulator
from watcher import __version__
from watcher.clock import SystemClock, rfc3339
from watcher.config import SinkConfig, load_config
from watcher.delivery.dispatcher import Dispatcher
from watcher.errors import DeliveryError
from watcher.events import Event, event_id
from watcher.records import PageCommit
from watcher.runtime import runtime
from watcher.signing import decode_secret, sign, webhook_headers
from watcher.sinks import build_sink
from watcher.sinks.base import Attempt
from watcher.sinks.broker import PIPELINE, probe_at_start
from watcher.state.records import PENDING
from watcher.state.store import Store

BACKFILL_FROM = "2000-01-01T00:00:00Z"
SQLITE_STATE = 'path = "state.db"'  # the body of [state] in every case but the postgres one


def write_config(
    folder: Path,
    api: str,
    *,
    sinks: str = "",
    start: str = BACKFILL_FROM,
    interval: float = 2,
    updates: bool = False,
    campaigns: bool = False,
    state: str = SQLITE_STATE,
) -> Path:
    path = folder / "bench.toml"
    path.write_text(
        f"""
[convertr]
base_url = "{api}"
username = "{USERNAME}"
password = "{PASSWORD}"
request_budget = 2900
[state]
{state}
[leads]
interval = {interval}
lookback = "30s"
updates = {"true" if updates else "false"}
start = "{start}"
[campaigns]
enabled = {"true" if campaigns else "false"}
[log]
level = "warning"
format = "json"
{sinks}
"""
    )
    # As an operator keeps it (the file holds secrets); a readable one makes every command warn.
    path.chmod(0o600)
    return path


def webhook_sink(url: str, *, enabled: bool = True, concurrency: int = 4) -> str:
    return f"""
[[sinks]]
name = "bench"
type = "webhook"
url = "{url}"
secret = "{SECRET}"
concurrency = {concurrency}
enabled = {"true" if enabled else "false"}
retry_schedule = ["1s"]
"""


# --- ingest -----------------------------------------------------------------------------------


async def plain_walk(api: str) -> tuple[int, float]:
    """Log in and read every page of the backfill query with a bare httpx client: the baseline."""
    params = {"createdTs[strictly_after]": "1999-12-31T23:59:59+00:00", "order[id]": "asc", "itemsPerPage": "100"}
    async with httpx.AsyncClient(base_url=api, timeout=60) as client:
        token = (await client.post("/api/login", data={"username": USERNAME, "password": PASSWORD})).json()
        headers = {"Authorization": f"Bearer {token['access_token']}", "Accept": "application/ld+json"}
        started = time.perf_counter()
        count, page = 0, 1
        while True:
            doc = (await client.get("/api/v4/leads", params={**params, "page": str(page)}, headers=headers)).json()
            members = doc["hydra:member"]
            count += len(members)
            last = doc.get("hydra:view", {}).get("hydra:last", "")
            last_page = int(last.rsplit("page=", 1)[-1]) if "page=" in last else 1
            if not members or page >= last_page:
                break
            page += 1
        return count, time.perf_counter() - started


async def daemon_walk(api: str, folder: Path) -> tuple[int, float, int]:
    """The real path: client, detection and a transaction per page into the outbox (sink queued, not
    sent): leads announced, seconds, and API requests made (the login and start-up checks too)."""
    state = folder / "state.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    config = load_config(write_config(folder, api, sinks=webhook_sink("http://127.0.0.1:9/", enabled=False)))
    async with runtime(config, SystemClock()) as rt:
        started = time.perf_counter()
        results = await rt.poller.poll_leads()
        elapsed = time.perf_counter() - started
        return sum(r.new for r in results), elapsed, rt.client.request_count


def ingest(n: int, runs: int) -> dict[str, float]:
    """Each walk of a run against a freshly started simulator (a real Convertr renders every page
    anew); then both again against the now warm simulator, whose render cache makes pages nearly
    free, which is the harshest comparison for the daemon and is recorded too."""
    cold_plain, cold_daemon, warm_plain, warm_daemon, requests = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            with simulator(n) as api:
                count, seconds = asyncio.run(plain_walk(api))
                cold_plain.append(count / seconds)
            with simulator(n) as api:
                new, seconds, made = asyncio.run(daemon_walk(api, Path(tmp)))
                assert new == count == n, (new, count, n)
                cold_daemon.append(new / seconds)
                requests.append(float(made))
                count, seconds = asyncio.run(plain_walk(api))
                warm_plain.append(count / seconds)
                new, seconds, _ = asyncio.run(daemon_walk(api, Path(tmp)))
                warm_daemon.append(new / seconds)
    med = statistics.median
    return {
        "plain_leads_per_s": med(cold_plain),
        "daemon_leads_per_s": med(cold_daemon),
        "ratio": med(cold_daemon) / med(cold_plain),
        "warm_plain_leads_per_s": med(warm_plain),
        "warm_daemon_leads_per_s": med(warm_daemon),
        "warm_ratio": med(warm_daemon) / med(warm_plain),
        "requests": med(requests),
    }


# --- dispatch ---------------------------------------------------------------------------------


def _events(n: int) -> list[Event]:
    lead = {
        "@id": "/api/v4/leads/0",
        "@type": "Lead",
        "firstName": "Ada",
        "email": "ada@example.com",
        "leadData": [{"name": f"field{i}", "value": "x" * 20} for i in range(10)],
        "campaign": "/api/v4/campaigns/1",
    }
    return [
        Event(
            event_id("lead.created", f"lead:{i}", ""),
            "lead.created",
            rfc3339(0),
            {"lead": {**lead, "id": i}},
            f"lead:{i}",
            1,
        )
        for i in range(n)
    ]


async def plain_posts(url: str, events: list[Event], concurrency: int) -> float:
    keys = [decode_secret(SECRET)]
    async with httpx.AsyncClient(timeout=15) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(event: Event) -> None:
            body = event.body()
            async with gate:
                headers = webhook_headers(event.id, int(time.time()), body, keys, __version__)
                response = await client.post(url, content=body, headers=headers)
                assert response.status_code == 204

        started = time.perf_counter()
        await asyncio.gather(*(one(e) for e in events))
        return time.perf_counter() - started


async def daemon_dispatch(url: str, events: list[Event], concurrency: int, folder: Path) -> float:
    store = _outbox(folder, events)
    config = load_config(write_config(folder, "http://127.0.0.1:9", sinks=webhook_sink(url, concurrency=concurrency)))
    return await _dispatched(store, config.sinks[0])


async def _dispatched(store: Store, sink_config: SinkConfig, make: Callable[[SinkConfig], Any] | None = None) -> float:
    """Seconds the dispatcher takes to deliver everything pending in `store` through one sink."""
    clock = SystemClock()
    sinks = [make(sink_config) if make else build_sink(sink_config, clock=clock, version=__version__)]
    dispatcher = Dispatcher(store, sinks, clock)
    stopping = asyncio.Event()
    # A broker sink connects (and finds its stream) before the clock starts, as the daemon does at
    # start-up and as the plain loop does before its own clock: both sides are timed warm.
    await probe_at_start(sinks)
    started = time.perf_counter()
    task = asyncio.create_task(dispatcher.run(stopping))
    # One indexed row, not the sink's counts: a count walks every delivery, and the dispatcher under
    # test shares this thread, so a costly poll here would be charged to the daemon's figure.
    while store.due("bench", math.inf, 1):
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    stopping.set()
    await task
    await sinks[0].aclose()
    assert all(d["status"] != PENDING for d in store.deliveries())
    store.close()
    return elapsed


def dispatch(n: int, runs: int, concurrency: int = 4) -> dict[str, float]:
    events = _events(n)
    with tempfile.TemporaryDirectory() as tmp, receiver(Path(tmp) / "recv.log") as url:
        plain, daemon = [], []
        for _ in range(runs):
            plain.append(n / asyncio.run(plain_posts(url, events, concurrency)))
            daemon.append(n / asyncio.run(daemon_dispatch(url, events, concurrency, Path(tmp))))
    p, d = statistics.median(plain), statistics.median(daemon)
    return {"plain_events_per_s": p, "daemon_events_per_s": d, "ratio": d / p}


def _outbox(folder: Path, events: list[Event]) -> Store:
    """A fresh state file whose outbox holds `events`, pending for the sink "bench"."""
    state = folder / "dispatch.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    store = Store.open(state)
    for start in range(0, len(events), 100):
        store.commit_page(PageCommit("bench", 0.0, events=[(e, ["bench"]) for e in events[start : start + 100]]))
    return store


# --- broker sinks -----------------------------------------------------------------------------
# The daemon's path (outbox, dispatcher, broker sink) against a plain loop with the same client
# library and the same confirmation semantics: every message persistent where the broker offers
# it, signed the same way, each publish awaiting its confirmation. The daemon has up to
# `concurrency` attempts of up to PIPELINE events each out at once; the plain loop gets the same
# number of messages in flight (it is faster so than with `concurrency` alone, for every broker).

BROKER_URLS = {
    "nats": "nats://127.0.0.1:4222",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
    "redis": "redis://127.0.0.1:6379/0",
}


async def _broker_destination(kind: str, name: str, make: bool) -> None:
    """Create (or remove) the stream, exchange and queue, or key a run publishes to."""
    url = BROKER_URLS[kind]
    if kind == "nats":
        import nats

        nc = await nats.connect(url)
        js = nc.jetstream()
        with suppress(Exception):
            await js.delete_stream(name)
        if make:
            await js.add_stream(name=name, subjects=[f"{name}.>"])
        await nc.close()
    elif kind == "amqp":
        import aio_pika

        async with await aio_pika.connect(url) as connection:
            channel = await connection.channel()
            with suppress(Exception):
                await channel.queue_delete(name)
            with suppress(Exception):
                await channel.exchange_delete(name)
            if make:
                exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
                queue = await channel.declare_queue(name, durable=True)
                await queue.bind(exchange, "#")
    else:
        import redis.asyncio as aredis

        client = aredis.Redis.from_url(url)
        await client.delete(name)
        await client.aclose()


def broker_sink_config(kind: str, name: str, concurrency: int) -> SinkConfig:
    where = {"nats": {"subject": name + ".{type}"}, "amqp": {"exchange": name}, "redis": {"stream": name}}[kind]
    return SinkConfig(
        "bench",
        kind,
        BROKER_URLS[kind],
        secrets=(SECRET,),
        concurrency=concurrency,
        **where,  # type: ignore[arg-type]
    )


async def plain_publish(kind: str, name: str, events: list[Event], concurrency: int) -> float:
    """Seconds a plain loop takes to publish every event and have each confirmed, `concurrency`
    publishes awaiting their confirmation at once."""
    keys = [decode_secret(SECRET)]
    gate = asyncio.Semaphore(concurrency)
    url = BROKER_URLS[kind]

    def signed(event: Event) -> tuple[bytes, dict[str, str]]:
        body = event.body()
        stamp = int(time.time())
        return body, {"webhook-id": event.id, "webhook-timestamp": str(stamp), "type": event.type,
                      "webhook-signature": sign(event.id, stamp, body, keys)}  # fmt: skip

    if kind == "nats":
        import nats

        nc = await nats.connect(url)
        js = nc.jetstream()

        async def one(event: Event) -> None:
            body, headers = signed(event)
            async with gate:
                await js.publish(f"{name}.{event.type}", body, headers={"Nats-Msg-Id": event.id, **headers})

        close: Any = nc.close
    elif kind == "amqp":
        import aio_pika

        connection = await aio_pika.connect(url)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(name, ensure=True)

        async def one(event: Event) -> None:
            body, headers = signed(event)
            message = aio_pika.Message(
                body,
                headers=dict(headers),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event.id,
                type=event.type,
            )
            async with gate:
                await exchange.publish(message, routing_key=event.type, mandatory=True)

        close = connection.close
    else:
        import redis.asyncio as aredis

        # The pool must not be the limit: the semaphore is (one connection per XADD in flight).
        client = aredis.Redis.from_url(url, max_connections=concurrency)

        async def one(event: Event) -> None:
            body, headers = signed(event)
            async with gate:
                await client.xadd(name, {"body": body, **headers})

        close = client.aclose
    started = time.perf_counter()
    await asyncio.gather(*(one(e) for e in events))
    elapsed = time.perf_counter() - started
    await close()
    return elapsed


class _Confirmed:
    """A sink whose every attempt is confirmed at once: what the delivery engine alone costs,
    pipelining as the broker sinks do."""

    max_batch = PIPELINE
    min_interval = 0.0

    def __init__(self, config: SinkConfig) -> None:
        self.name = config.name
        self.config = config

    async def deliver(self, events: Sequence[Event]) -> Attempt:
        await asyncio.sleep(0)
        return Attempt(status=None, duration=0.0, response_excerpt="")

    async def deliver_each(self, events: Sequence[Event]) -> list[Attempt | DeliveryError]:
        await asyncio.sleep(0)
        return [Attempt(status=None, duration=0.0, response_excerpt="") for _ in events]

    async def aclose(self) -> None:
        return None


# How many times `n` events each broker's runs publish: NATS and Redis take 10 000 in under a
# second, where a moment's contention on a shared machine swings a figure by a third; three
# times as many keep each phase a couple of seconds long.
BROKER_SCALE = {"nats": 3, "amqp": 1, "redis": 3}


def brokers(n: int, runs: int, concurrency: int = 8) -> dict[str, float]:
    """Events per second through each broker sink and through its plain loop, and their ratio; and
    the engine's own ceiling (a sink that confirms at once), which bounds every broker figure.

    The two phases alternate which goes first from run to run, so neither is always the one that
    follows the other's teardown (a JetStream stream of thousands of messages being deleted)."""
    events = _events(n)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ceiling = []
        for _ in range(runs):
            store = _outbox(Path(tmp), events)
            ceiling.append(
                n / asyncio.run(_dispatched(store, broker_sink_config("redis", "x", concurrency), _Confirmed))
            )
        out["engine_ceiling_events_per_s"] = statistics.median(ceiling)
        for kind in BROKER_URLS:
            published = _events(n * BROKER_SCALE[kind])
            plain, daemon = [], []
            for run in range(runs):
                phases = [("plain", plain), ("daemon", daemon)]
                for phase, results in phases if run % 2 == 0 else phases[::-1]:
                    name = f"bench{kind}{phase}{run}{os.getpid()}"
                    asyncio.run(_broker_destination(kind, name, make=True))
                    try:
                        if phase == "plain":
                            seconds = asyncio.run(plain_publish(kind, name, published, concurrency * PIPELINE))
                        else:
                            store = _outbox(Path(tmp), published)
                            seconds = asyncio.run(_dispatched(store, broker_sink_config(kind, name, concurrency)))
                        results.append(len(published) / seconds)
                    finally:
                        asyncio.run(_broker_destination(kind, name, make=False))
            p, d = statistics.median(plain), statistics.median(daemon)
            out |= {f"{kind}_plain_events_per_s": p, f"{kind}_daemon_events_per_s": d, f"{kind}_ratio": d / p}
    return out


# --- latency ----------------------------------------------------------------------------------


def latency(leads: int = 500, interval: float = 2.0, rate: float = 25.0) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, simulator(20) as api:
        folder = Path(tmp)
        log = folder / "recv.log"
        with receiver(log) as url:
            config = write_config(folder, api, sinks=webhook_sink(url), start="now", interval=interval)
            daemon = subprocess.Popen(
                [sys.executable, "-m", "watcher", "run", "-c", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=child_env(),
            )
            try:
                _wait_baseline(folder / "state.db")
                created: dict[int, float] = {}
                with httpx.Client(base_url=api) as client:
                    for _ in range(leads):
                        doc = client.post("/_sim/leads", json={}).json()
                        created[int(doc["id"])] = time.monotonic()
                        time.sleep(1.0 / rate)
                deadline = time.monotonic() + 30
                arrived: dict[int, float] = {}
                while time.monotonic() < deadline and len(arrived) < len(created):
                    arrived = _arrivals(log)
                    time.sleep(0.2)
            finally:
                daemon.terminate()
                daemon.wait(30)
    delays = sorted(arrived[i] - created[i] for i in created if i in arrived)
    missing = len(created) - len(delays)
    assert missing == 0, f"{missing} leads never arrived"
    return {
        "interval_s": interval,
        "p50_s": statistics.median(delays),
        "p99_s": delays[min(len(delays) - 1, int(len(delays) * 0.99))],
        "leads": float(len(delays)),
    }


def _arrivals(log: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in log.read_text().splitlines():
        _id, lead, at = line.split()
        if lead != "None":
            out.setdefault(int(lead), float(at))
    return out


def _wait_baseline(state: Path, timeout: float = 60) -> None:
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.exists():
            try:
                with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as conn:
                    row = conn.execute("SELECT polls FROM cursors WHERE stream = 'leads.created'").fetchone()
                if row and row[0]:
                    return
            except sqlite3.Error:
                pass
        time.sleep(0.1)
    raise RuntimeError("the daemon did not finish its baseline")


# --- memory and state size ----------------------------------------------------------------------


_PEAK_WRAPPER = """
import sys
from watcher.cli import main
code = main(["once", "-c", sys.argv[1]])
with open("/proc/self/status") as status:
    print("VMHWM_KB", next(line.split()[1] for line in status if line.startswith("VmHWM:")))
sys.exit(code)
"""


def backfill_process(n: int) -> dict[str, float]:
    """`convertr-watcher once` backfilling `n` leads with updates on: peak RSS and state bytes per lead."""
    with tempfile.TemporaryDirectory() as tmp, simulator(n) as api:
        folder = Path(tmp)
        config = write_config(folder, api, updates=True)
        # ru_maxrss of a child counts the forked parent image before exec (Linux keeps the larger
        # high-water mark), so the child reports its own VmHWM when it is done instead.
        cmd = [sys.executable, "-c", _PEAK_WRAPPER, str(config)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        if proc.returncode != 0:
            raise RuntimeError(f"once failed: {proc.stderr[-2000:]}")
        peak_kb = int(proc.stdout.split("VMHWM_KB", 1)[1].split()[0])
        store = Store.open(folder / "state.db")
        tracked = store.lead_count()
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
        size = sum(p.stat().st_size for p in folder.glob("state.db*"))
    assert tracked == n, (tracked, n)
    return {"rss_mb": peak_kb / 1024, "state_bytes_per_lead": size / tracked}


# --- API cost ---------------------------------------------------------------------------------


async def _idle_requests(api: str, folder: Path, updates: bool) -> dict[str, float]:
    cfg = load_config(write_config(folder, api, start="now", updates=updates, campaigns=True))
    async with runtime(cfg, SystemClock()) as rt:
        await rt.poller.poll_leads()  # the baseline, and the one hydra:search read per process
        await rt.poller.poll_campaigns()
        out: dict[str, float] = {}
        for name, poll in (("leads", rt.poller.poll_leads), ("campaigns", rt.poller.poll_campaigns)):
            before = rt.client.request_count
            results = await poll()
            out[name] = float(rt.client.request_count - before)
            out[f"{name}_pages"] = float(sum(r.pages for r in results))
        return out


def api_cost() -> dict[str, float]:
    """Requests made by polls with nothing new: leads.created alone, then with leads.updated too."""
    with tempfile.TemporaryDirectory() as tmp, simulator(200, campaigns=150) as api:
        created = asyncio.run(_idle_requests(api, Path(tmp), updates=False))
        (Path(tmp) / "state.db").unlink()
        both = asyncio.run(_idle_requests(api, Path(tmp), updates=True))
    return {
        "leads_created": created["leads"],
        "leads_updated": both["leads"] - created["leads"],
        "campaigns": created["campaigns"],
        "campaign_pages": created["campaigns_pages"],
    }


def machine() -> dict[str, Any]:
    import platform

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
    }
