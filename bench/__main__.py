"""`make bench`: run every measurement, write bench/results.json and docs/benchmarks.md.

    python -m bench [--runs N] [--quick] [--only NAME[,NAME]] [--render-only]

--quick uses smaller sizes (for a smoke run); the published figures come from a full run.
--only runs the named cases (see CASES) and merges their keys into the existing results.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import cases, e2e, load

ROOT = Path(__file__).resolve().parent.parent
E2E_CONCURRENCY = 8  # the webhook sink's default concurrency; a parameter of e2e.backfill
LARGE_RUNS = 1  # runs of the 20 000-lead `once` case at most: a run of it takes about a minute
SLOW_DELAY, SLOW_CONCURRENCY = 0.05, 16


def case_ingest(results: dict[str, Any], runs: int, quick: bool) -> None:
    """Backfill through the daemon's poller in-process against a plain httpx walk."""
    large = 20_000 if quick else 100_000
    print(f"ingest: {large} leads, {runs} runs each (daemon path vs plain httpx walk)", flush=True)
    ingest = cases.ingest(large, runs)
    results["ingest_ratio"] = ingest["ratio"]
    results["ingest_leads_per_s"] = ingest["daemon_leads_per_s"]
    results["ingest_plain_leads_per_s"] = ingest["plain_leads_per_s"]
    results["ingest_warm_ratio"] = ingest["warm_ratio"]
    results["ingest_warm_leads_per_s"] = ingest["warm_daemon_leads_per_s"]
    results["ingest_warm_plain_leads_per_s"] = ingest["warm_plain_leads_per_s"]


def case_dispatch(results: dict[str, Any], runs: int, quick: bool) -> None:
    """The dispatcher in-process against plain signed POSTs."""
    n_events = 2_000 if quick else 10_000
    print(f"dispatch: {n_events} events, {runs} runs each (dispatcher vs plain signed POSTs)", flush=True)
    dispatch = cases.dispatch(n_events, runs)
    results["dispatch_ratio"] = dispatch["ratio"]
    results["dispatch_events_per_s"] = dispatch["daemon_events_per_s"]
    results["dispatch_plain_events_per_s"] = dispatch["plain_events_per_s"]


def case_latency(results: dict[str, Any], runs: int, quick: bool) -> None:
    """Lead visible to webhook received, with the daemon running."""
    n_latency = 100 if quick else 500
    print(f"latency: {n_latency} leads at a 2 s lead interval", flush=True)
    lat = cases.latency(n_latency)
    results["latency_interval_s"] = lat["interval_s"]
    results["latency_p50_s"] = lat["p50_s"]
    results["latency_p99_s"] = lat["p99_s"]
    results["latency_leads"] = lat["leads"]


def case_memory(results: dict[str, Any], runs: int, quick: bool) -> None:
    """Peak RSS and state bytes per lead of `once` backfills."""
    small, large = (2_000, 20_000) if quick else (10_000, 100_000)
    print(f"memory and state size: backfills of {small} and {large} leads with updates on", flush=True)
    a = cases.backfill_process(small)
    b = cases.backfill_process(large)
    results["rss_mb_10k"] = a["rss_mb"]
    results["rss_mb_100k"] = b["rss_mb"]
    results["rss_growth"] = b["rss_mb"] / a["rss_mb"] - 1
    results["state_bytes_per_lead"] = b["state_bytes_per_lead"]


def case_api(results: dict[str, Any], runs: int, quick: bool) -> None:
    """Requests made by idle polls."""
    print("API cost of an idle poll cycle", flush=True)
    cost = cases.api_cost()
    results["idle_requests_leads"] = cost["leads_created"]
    results["idle_requests_leads_updated"] = cost["leads_updated"]
    results["idle_requests_campaigns"] = cost["campaigns"]
    results["idle_campaign_pages"] = cost["campaign_pages"]


def case_once(results: dict[str, Any], runs: int, quick: bool) -> None:
    """`convertr-watcher once` backfills as processes against the plain program, small and large."""
    small, large = (500, 5_000) if quick else (2_000, 20_000)
    # The large size is about ten times the work; fewer runs keep `make bench` near ten minutes.
    large_runs = min(runs, LARGE_RUNS)
    for n, label, r in ((small, "2k", runs), (large, "20k", large_runs)):
        print(f"once: {n} leads, concurrency {E2E_CONCURRENCY}, {r} runs each (process vs plain process)", flush=True)
        out = e2e.backfill(n, r, E2E_CONCURRENCY)
        results[f"e2e_once_{label}_s"] = out["once_s"]
        results[f"e2e_plain_{label}_s"] = out["plain_s"]
        results[f"e2e_ratio_{label}"] = out["ratio"]
        results[f"e2e_once_{label}_events_per_s"] = out["events_per_s"]
        results[f"e2e_once_{label}_delivery_events_per_s"] = out["delivery_events_per_s"]
    results["e2e_large_runs"] = large_runs
    # Per-event time at the large size over the small one: 1.0 is a flat cost per event.
    results["e2e_per_event_growth"] = (results["e2e_once_20k_s"] / large) / (results["e2e_once_2k_s"] / small)


def case_apprise(results: dict[str, Any], runs: int, quick: bool) -> None:
    """Apprise notifying one lead at a time against `once`, measured in the same runs."""
    n = 500 if quick else 2_000
    print(f"apprise: {n} leads, {runs} runs each (apprise one by one vs once)", flush=True)
    out = e2e.apprise_peer(n, runs, E2E_CONCURRENCY)
    results["apprise_2k_s"] = out["apprise_s"]
    results["apprise_once_2k_s"] = out["once_s"]
    results["apprise_speedup"] = out["speedup"]


def case_slow(results: dict[str, Any], runs: int, quick: bool) -> None:
    """`once` against the plain program with a receiver that takes 50 ms per request, 16 at a time."""
    n = 500 if quick else 2_000
    print(f"slow receiver: {n} leads, {SLOW_DELAY}s a request, concurrency {SLOW_CONCURRENCY}, {runs} runs", flush=True)
    out = e2e.backfill(n, runs, SLOW_CONCURRENCY, SLOW_DELAY)
    results["slow16_once_s"] = out["once_s"]
    results["slow16_plain_s"] = out["plain_s"]
    results["slow16_ratio"] = out["ratio"]
    results["slow16_events_per_s"] = out["events_per_s"]
    results["slow16_delivery_events_per_s"] = out["delivery_events_per_s"]
    results["slow16_ideal_events_per_s"] = SLOW_CONCURRENCY / SLOW_DELAY


def case_start(results: dict[str, Any], runs: int, quick: bool) -> None:
    """Spawn to first API request of `once`, against a bare httpx one-liner."""
    r = max(runs, 5)  # a few hundred milliseconds each: cheap enough for more runs than the rest
    print(f"start: spawn to first API request, {r} runs each (once vs python -c httpx.get)", flush=True)
    out = e2e.start(r)
    results["start_first_request_ms"] = out["daemon_ms"]
    results["start_plain_first_request_ms"] = out["plain_ms"]
    results["start_overhead_ms"] = out["overhead_ms"]


def case_brokers(results: dict[str, Any], runs: int, quick: bool) -> None:
    """Each broker sink through the dispatcher against a plain publish loop, same library and confirms."""
    n_events = 2_000 if quick else 10_000
    counts = ", ".join(f"{kind} {n_events * scale}" for kind, scale in cases.BROKER_SCALE.items())
    print(f"brokers: events {counts}, {runs} runs each (dispatcher vs plain loop, alternating first)", flush=True)
    for key, value in cases.brokers(n_events, runs).items():
        results[f"broker_{key}"] = value


TAKEOVER_RUNS = 10  # failovers: each lasts about a lease (15 s) and is not repeated by --runs


def case_postgres(results: dict[str, Any], runs: int, quick: bool) -> None:
    """`once` with its state in PostgreSQL against the same with SQLite, state size, and takeover (issue 21)."""
    n = 500 if quick else 2_000
    print(f"postgres: {n} leads, concurrency {E2E_CONCURRENCY}, {runs} runs each (PostgreSQL vs SQLite)", flush=True)
    out = e2e.postgres_backfill(n, runs, E2E_CONCURRENCY)
    results["pg_once_2k_s"] = out["postgres_s"]
    results["pg_sqlite_once_2k_s"] = out["sqlite_s"]
    results["pg_ratio_2k"] = out["ratio"]
    results["pg_state_bytes_per_lead"] = out["postgres_bytes_per_lead"]
    results["pg_sqlite_state_bytes_per_lead"] = out["sqlite_bytes_per_lead"]
    takeovers = 3 if quick else TAKEOVER_RUNS
    print(f"postgres: takeover after SIGKILL of the leader, default lease, {takeovers} failovers", flush=True)
    took = e2e.takeover(takeovers)
    results["pg_takeover_runs"] = takeovers
    results["pg_takeover_ttl_s"] = took["ttl_s"]
    results["pg_takeover_bound_s"] = took["bound_s"]
    results["pg_takeover_median_s"] = took["median_s"]
    results["pg_takeover_worst_s"] = took["worst_s"]


# (interval s, page size, simulated seconds of arrivals, rates tried in turn): each run outlasts the
# request budget's 5-minute window, or it could not show the budget running out.
KEEP_UP_GRID = (
    (1.0, 10, 360.0, (4.0, 8.0, 16.0)),
    (1.0, 100, 360.0, (16.0, 32.0, 64.0)),
    (60.0, 10, 420.0, (4.0, 8.0, 16.0)),
    (60.0, 100, 420.0, (16.0, 64.0)),
)
STEADY_RATES = (1.0, 5.0, 16.0, 64.0)


def case_load(results: dict[str, Any], runs: int, quick: bool) -> None:
    """What walks cost: a 10 000-lead backfill's requests and speed, requests per poll under steady
    arrivals, and the highest arrival rate kept up with (issue 19)."""
    print(f"load: backfill of 10 000 leads in pages of 100, {runs} runs (daemon vs plain httpx walk)", flush=True)
    cost = cases.ingest(10_000, runs)
    results["backfill_10k_requests"] = cost["requests"]
    results["backfill_10k_ratio"] = cost["ratio"]
    print("load: requests per poll at 1 s intervals, pages of 100, by arrival rate", flush=True)
    for rate, per_poll in load.steady_requests(STEADY_RATES, seconds=60.0 if quick else 120.0).items():
        results[f"steady_requests_per_poll_{rate:g}_per_s"] = per_poll
    for interval, page, seconds, rates in KEEP_UP_GRID:
        print(f"load: highest rate kept up with, interval {interval:g} s, pages of {page}", flush=True)
        span = min(seconds, 320.0) if quick else seconds
        results[f"kept_up_per_s_i{interval:g}_p{page}"] = load.highest_rate(page, interval, span, rates)
        # A plain walk pays one request a page; both walks read every new lead (updates on).
        results[f"budget_allows_per_s_p{page}"] = 2000 / 300 * page / 2


CASES: dict[str, Callable[[dict[str, Any], int, bool], None]] = {
    "ingest": case_ingest,
    "dispatch": case_dispatch,
    "latency": case_latency,
    "memory": case_memory,
    "api": case_api,
    "once": case_once,
    "apprise": case_apprise,
    "slow": case_slow,
    "start": case_start,
    "brokers": case_brokers,
    "load": case_load,
    "postgres": case_postgres,
}


def run(runs: int, quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    """Run the named cases (all by default); the results, with the machine and when."""
    from watcher.logs import configure_logging

    configure_logging("warning", "json")
    names = only or list(CASES)
    if "apprise" in names and importlib.util.find_spec("apprise") is None:
        # Before anything runs, not ten minutes in.
        raise SystemExit("the apprise case needs apprise: pip install -e '.[bench]' (make bench does)")
    results: dict[str, Any] = {"machine": cases.machine(), "runs": runs, "quick": quick}
    t0 = time.monotonic()
    for name in names:
        CASES[name](results, runs, quick)
    results["seconds"] = round(time.monotonic() - t0, 1)
    results["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return results


TARGETS: list[tuple[str, str, str, Any]] = [
    # (key, label, target text, predicate)
    (
        "ingest_ratio",
        "Ingest: daemon backfill ÷ plain httpx walk (leads/s)",
        "≥ 0.8",
        lambda r: r["ingest_ratio"] >= 0.8,
    ),
    (
        "dispatch_ratio",
        "Dispatch: dispatcher ÷ plain signed POST loop (events/s)",
        "≥ 0.8",
        lambda r: r["dispatch_ratio"] >= 0.8,
    ),
    (
        "latency_p99_s",
        "Latency p99, lead visible → webhook received (s)",
        "≤ interval + 1 s",
        lambda r: r["latency_p99_s"] <= r["latency_interval_s"] + 1,
    ),
    ("latency_p50_s", "Latency p50 (s)", "(record)", None),
    ("rss_mb_10k", "Peak RSS, small backfill (MB)", "≤ 120", lambda r: r["rss_mb_10k"] <= 120),
    (
        "rss_mb_100k",
        "Peak RSS, large backfill (MB)",
        "≤ 120, growth ≤ 10 %",
        lambda r: r["rss_mb_100k"] <= 120 and r["rss_growth"] <= 0.10,
    ),
    (
        "state_bytes_per_lead",
        "State file bytes per tracked lead (updates on)",
        "≤ 1536",
        lambda r: r["state_bytes_per_lead"] <= 1536,
    ),
    (
        "idle_requests_leads",
        "Requests per idle leads poll (leads.created)",
        "1",
        lambda r: r["idle_requests_leads"] == 1,
    ),
    (
        "idle_requests_campaigns",
        "Requests per idle campaigns poll",
        "1 per page",
        lambda r: r["idle_requests_campaigns"] == r["idle_campaign_pages"],
    ),
    ("ingest_warm_ratio", "Ingest against a warm simulator (pages nearly free)", "(record)", None),
    ("idle_requests_leads_updated", "Requests per idle leads.updated poll", "(record)", None),
    ("ingest_leads_per_s", "Ingest, absolute (leads/s)", "(record)", None),
    ("dispatch_events_per_s", "Dispatch, absolute (events/s)", "(record)", None),
    (
        "e2e_ratio_2k",
        "`once` backfill as a process, 2 000 leads: plain process ÷ daemon (seconds)",
        "≥ 0.9",
        lambda r: r["e2e_ratio_2k"] >= 0.9,
    ),
    (
        "e2e_ratio_20k",
        "`once` backfill as a process, 20 000 leads: plain process ÷ daemon (seconds)",
        "≥ 0.9",
        lambda r: r["e2e_ratio_20k"] >= 0.9,
    ),
    (
        "e2e_per_event_growth",
        "`once` seconds per event, 20 000 leads ÷ 2 000 leads",
        "≤ 1.10",
        lambda r: r["e2e_per_event_growth"] <= 1.10,
    ),
    (
        "apprise_speedup",
        "Apprise one by one ÷ `once`, 2 000 leads (seconds)",
        "≥ 2",
        lambda r: r["apprise_speedup"] >= 2,
    ),
    (
        "slow16_ratio",
        "Slow receiver (50 ms, concurrency 16), 2 000 leads: plain process ÷ daemon (seconds)",
        "≥ 0.9",
        lambda r: r["slow16_ratio"] >= 0.9,
    ),
    ("slow16_events_per_s", "Slow receiver: `once` events/s, spawn to exit (ideal 16 ÷ 0.05 = 320)", "(record)", None),
    ("slow16_delivery_events_per_s", "Slow receiver: `once` events/s, first to last arrival", "(record)", None),
    ("e2e_once_2k_s", "`once`, 2 000 leads (s)", "(record)", None),
    ("e2e_plain_2k_s", "Plain process, 2 000 leads (s)", "(record)", None),
    ("e2e_once_20k_s", "`once`, 20 000 leads (s)", "(record)", None),
    ("e2e_plain_20k_s", "Plain process, 20 000 leads (s)", "(record)", None),
    ("e2e_once_2k_delivery_events_per_s", "`once`, 2 000 leads: events/s, first to last arrival", "(record)", None),
    ("apprise_2k_s", "Apprise, 2 000 leads (s)", "(record)", None),
    ("slow16_once_s", "Slow receiver: `once` (s)", "(record)", None),
    ("slow16_plain_s", "Slow receiver: plain process (s)", "(record)", None),
    ("start_first_request_ms", "Start: spawn → first API request, `once` (ms)", "(record)", None),
    ("start_plain_first_request_ms", "Start: spawn → first request, `python -c httpx.get` (ms)", "(record)", None),
    ("start_overhead_ms", "Start: `once` − the httpx one-liner (ms)", "(record)", None),
    *(
        (
            f"broker_{kind}_ratio",
            f"Broker sink {label}: dispatcher ÷ plain confirmed publish loop (events/s)",
            "≥ 0.9",
            lambda r, kind=kind: r[f"broker_{kind}_ratio"] >= 0.9,
        )
        for kind, label in (("nats", "NATS JetStream"), ("amqp", "RabbitMQ"), ("redis", "Redis Streams"))
    ),
    (
        "broker_engine_ceiling_events_per_s",
        "Broker sinks: the engine alone, a sink confirming at once (events/s)",
        "(record)",
        None,
    ),
    *(
        (f"broker_{kind}_{side}_events_per_s", f"Broker sink {kind}, {side} (events/s)", "(record)", None)
        for kind in ("nats", "amqp", "redis")
        for side in ("daemon", "plain")
    ),
    (
        "backfill_10k_requests",
        "Requests, backfill of 10 000 leads in pages of 100 (login and start-up checks included)",
        "≤ 105",
        lambda r: r["backfill_10k_requests"] <= 105,
    ),
    (
        "backfill_10k_ratio",
        "Backfill of 10 000 leads: daemon ÷ plain httpx walk (leads/s), nothing moving",
        "≥ 0.9",
        lambda r: r["backfill_10k_ratio"] >= 0.9,
    ),
    *[
        (
            f"steady_requests_per_poll_{rate:g}_per_s",
            f"Requests per leads poll, {rate:g} leads/s, 1 s interval, pages of 100",
            "(record)",
            None,
        )
        for rate in STEADY_RATES
    ],
    *[
        (
            f"kept_up_per_s_i{interval:g}_p{page}",
            f"Highest arrival rate kept up with (leads/s), interval {interval:g} s, pages of {page}, updates on",
            "(record)",
            None,
        )
        for interval, page, _, _ in KEEP_UP_GRID
    ],
    (
        "budget_allows_per_s_p10",
        "What the default budget allows a plain walk (leads/s), pages of 10, both walks",
        "(record)",
        None,
    ),
    (
        "budget_allows_per_s_p100",
        "What the default budget allows a plain walk (leads/s), pages of 100, both walks",
        "(record)",
        None,
    ),
    (
        "pg_ratio_2k",
        "`once`, 2 000 leads: state in SQLite ÷ state in PostgreSQL (seconds)",
        "≥ 0.7",
        lambda r: r["pg_ratio_2k"] >= 0.7,
    ),
    ("pg_once_2k_s", "`once`, 2 000 leads, PostgreSQL state (s)", "(record)", None),
    ("pg_sqlite_once_2k_s", "`once`, 2 000 leads, SQLite state, same runs (s)", "(record)", None),
    ("pg_state_bytes_per_lead", "PostgreSQL state bytes per lead (tables, indexes, TOAST)", "(record)", None),
    ("pg_sqlite_state_bytes_per_lead", "SQLite state bytes per lead, same backfill", "(record)", None),
    (
        "pg_takeover_worst_s",
        "PostgreSQL takeover after SIGKILL of the leader, worst (s), default lease",
        "≤ watcher.lease bound",
        lambda r: r["pg_takeover_worst_s"] <= r["pg_takeover_bound_s"],
    ),
    ("pg_takeover_median_s", "PostgreSQL takeover after SIGKILL of the leader, median (s)", "(record)", None),
]


def render(results: dict[str, Any], previous: str) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`python -m bench`), which writes `bench/results.json` and this table.",
        "Every ratio is measured inside one run against a plain baseline on the same machine, so machine",
        "noise cancels; absolute figures are for the record only. `python -m bench --only once,slow` re-runs",
        "single cases (names: " + ", ".join(f"`{name}`" for name in CASES) + ") and merges their figures in.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}.",
        f"Measured {results['measured_at']}; ingest, dispatch and the process cases are the median of"
        f" {results['runs']} runs each (the 20 000-lead `once` case of {results.get('e2e_large_runs', '?')}, the"
        f" start case of at least 5); total {results['seconds']} s{' (quick sizes)' if results['quick'] else ''}.",
        *_remeasured(results),
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    for key, label, target, ok in TARGETS:
        if key not in results:  # a case not measured yet (see --only)
            lines.append(f"| {label} | — | {target} |  |")
            continue
        value = results[key]
        shown = f"{value:.3f}" if isinstance(value, float) and value < 10 else f"{value:,.0f}"
        met = "" if ok is None else ("yes" if ok(results) else "**no**")
        lines.append(f"| {label} | {shown} | {target} | {met} |")
    lines += [
        "",
        "## What each figure measures",
        "",
        "- **Ingest**: the simulator (its own process) holds the leads; the daemon path is the real poller",
        "  (client, detection, one SQLite transaction per page into the outbox of a configured but disabled",
        "  sink) backfilling from 2000-01-01; the baseline logs in and reads the very same pages with a bare",
        "  httpx client and `json` parsing. Each walk of the main figure runs against a freshly started",
        "  simulator (a real Convertr renders every page anew); the warm figure repeats both walks against",
        "  the simulator after its render cache has filled.",
        "- **Dispatch**: events already in the outbox, delivered by the real dispatcher (signing, attempt",
        "  log, outcomes committed in groups) to a loopback receiver in its own process, against a plain",
        "  `asyncio.gather` of signed httpx POSTs with the same concurrency (4).",
        "- **Latency**: the daemon runs (`convertr-watcher run`, 2 s lead interval); leads are created",
        "  through the simulator's admin endpoint at 25 a second; the receiver stamps arrival on the same",
        "  monotonic clock.",
        "- **Memory**: peak RSS (the child's own `VmHWM`) of `convertr-watcher once` backfilling the",
        "  small and the large lead set with `updates = true`, no sinks.",
        "- **State size**: the state file (after a WAL checkpoint) divided by the tracked leads after the",
        "  large backfill: the lead snapshots (tracked fields only), cursors and indexes. Events that no",
        "  sink wants are not stored at all.",
        "- **API cost**: requests made by a poll with nothing new (150 campaigns: two pages at 100 per page).",
        "- **Broker sinks**: 30 000 events (NATS, Redis; 10 000 for RabbitMQ, slower, so each phase lasts a",
        "  couple of seconds) already in the outbox, delivered by the real dispatcher through",
        "  each broker sink (concurrency 8, signed, every publish confirmed: a JetStream ack, an AMQP",
        "  publisher confirm on a persistent message to a durable queue, an XADD reply) to the machine's",
        "  NATS, RabbitMQ and Redis, against a plain `asyncio.gather` with the same client library, the same",
        "  headers and signature and the same confirmation, each publish awaited on its own (`js.publish`,",
        "  `exchange.publish`, `xadd`). The daemon pipelines: each of its 8 attempts publishes up to 32",
        "  events (NATS: every message with its own reply subject, the acks read off one inbox",
        "  subscription; on aio-pika's channel, all 32 AMQP messages in one write with",
        "  aiormq's confirmation per message; one Redis pipeline without a transaction) and awaits their",
        "  confirmations, each event its own outcome; so the plain loop gets",
        "  the same 256 messages in flight (it is faster so than with 8, on every broker). Each side publishes to",
        "  a fresh stream, exchange and queue, or key, connected before its clock starts (the daemon connects",
        "  and finds its stream at start-up), and which side goes first alternates from run to run.",
        "  The engine-alone figure is the same dispatcher run",
        "  through a sink that confirms at once: it bounds every broker figure, since each event costs the",
        "  engine its outbox read, its share of a group commit of outcomes and attempt log, and the",
        "  bookkeeping of an attempt, on top of the publish. The harness waits for the outbox to drain by",
        "  reading one indexed row every 20 ms (in the dispatcher's thread, so its cost counts against the daemon).",
        "- **Load** (issue 19): the 10 000-lead backfill is the ingest case at that size (its requests are",
        "  the daemon's whole count, login and start-up checks included). Requests per poll and the rates",
        "  kept up with run in-process on one fake clock shared by the simulator and the daemon: each API",
        "  request takes 50 ms of it, budget waits sleep it, leads arrive at the rate however it passes,",
        "  a leads poll (updates on, lookback 5 min, default budget) runs every interval or at once after",
        "  one that overran. Kept up: every lead announced, none later than 2 × interval + 30 s after its",
        "  createdTs; the search stops at the first rate of its list that is not (so a top value means at",
        "  least that). A plain walk pays a request per page, so the budget (2000 per 5 min) allows it",
        "  2000 ÷ 300 × page ÷ 2 leads/s with both walks reading every new lead.",
        "",
        "The cases below run everything as its own process, as a user runs it, and time each program from",
        "`Popen` to exit (interpreter start, imports, login, the walk, every delivery, shutdown). Each run",
        "starts a fresh simulator (no rate limit); the receiver is one process for the case and must log",
        "exactly one distinct `webhook-id` per lead, or the case fails.",
        "",
        "- **`once` backfill**: `convertr-watcher once -c cfg` with one webhook sink (concurrency 8, the",
        "  default), updates and campaigns off, backfilling from 2000-01-01, against the plain program",
        "  (`python -m bench.plain`: log in, walk every page with a bare `httpx.AsyncClient`, then POST each",
        "  lead as a Standard Webhooks request signed with plain `hmac`, eight at a time over one client).",
        "  The ratio is plain seconds ÷ daemon seconds: above 1 the daemon is faster. The 20 000-lead size",
        "  runs fewer times than the rest (see above) to keep `make bench` near a quarter of an hour. The",
        "  first-to-last-arrival rate is the delivery phase alone, from the receiver's stamps.",
        "- **Flat cost**: seconds per event of `once` at 20 000 leads over the same at 2 000; start-up",
        "  is a larger share of the small run, so a figure well above 1 is a per-event cost that grows.",
        "- **Apprise**: `python -m bench.apprise_peer` reads the same leads as the plain program, then calls",
        '  `Apprise.notify(title="lead.created", body=<the lead as JSON>)` once per lead through a',
        "  `json://` target to the same receiver; timed against `once` in the same runs (its own runs, so",
        "  `--only apprise` stands alone). Needs the `bench` extra, which `make bench` installs.",
        "- **PostgreSQL state**: the `once` backfill above (2 000 leads, updates off, one webhook sink),",
        "  run twice per run against freshly started simulators: `[state] path` (SQLite) and `[state] url`",
        "  on a fresh PostgreSQL database of its own (dropped after the run); the ratio is SQLite seconds",
        "  over PostgreSQL seconds. State bytes per lead: the SQLite files after the process closed them,",
        "  and `pg_total_relation_size` of every table of the schema. Takeover: `bench.takeover`'s",
        "  SIGKILL case at the default lease (a leader process making fenced writes, a standby; seconds from",
        "  the kill to the standby leading), median and worst of 10, beside `LeaseTimings.takeover_bound`.",
        "- **Slow receiver**: the receiver sleeps 50 ms before answering each request; `once` and the",
        "  plain program both at concurrency 16, so 320 events/s is the ceiling.",
        "- **Start**: a stub API in the bench process stamps the monotonic time of the first request it",
        "  receives (503 to everything) and the client is killed then: `once -c cfg` against",
        '  `python -c "import httpx; httpx.get(URL)"`. The difference is what the daemon does before its',
        "  first request beyond starting Python and importing httpx.",
    ]
    if previous.strip():
        lines += ["", previous.strip()]
    return "\n".join(lines) + "\n"


def _remeasured(results: dict[str, Any]) -> list[str]:
    """A line naming the cases re-run alone (--only) after the full run, with their runs and time."""
    alone = results.get("remeasured") or {}
    if not alone:
        return []
    parts = [
        f"{name} ({meta['runs']} runs{', quick sizes' if meta['quick'] else ''}, {meta['measured_at']})"
        for name, meta in alone.items()
    ]
    return [f"Re-measured alone since: {'; '.join(parts)}."]


def _only(text: str) -> list[str]:
    """The --only value as case names, each checked against CASES."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown case {', '.join(unknown) or text!r}; cases: {', '.join(CASES)}")
    return names


def merge(path: Path, fresh: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The results file at `path` with the keys of the cases just run replaced; the full run's
    machine, runs and timing stay, and each case run alone is noted under `remeasured`."""
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else dict(fresh)
    meta = {"machine", "runs", "quick", "seconds", "measured_at"}
    results.update({k: v for k, v in fresh.items() if k not in meta})
    alone = results.setdefault("remeasured", {})
    for name in names:
        alone[name] = {"runs": fresh["runs"], "quick": fresh["quick"], "measured_at": fresh["measured_at"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    parser.add_argument("--render-only", action="store_true", help="rewrite docs/benchmarks.md from results.json")
    parser.add_argument(
        "--only",
        type=_only,
        metavar="NAME[,NAME]",
        help=f"run only these cases and merge their keys into results.json ({', '.join(CASES)})",
    )
    args = parser.parse_args()
    path = ROOT / "bench" / "results.json"
    if args.render_only:
        results = json.loads(path.read_text())
    elif args.only:
        results = merge(path, run(args.runs, args.quick, args.only), args.only)
        path.write_text(json.dumps(results, indent=2) + "\n")
    else:
        results = run(args.runs, args.quick)
        path.write_text(json.dumps(results, indent=2) + "\n")
    doc = ROOT / "docs" / "benchmarks.md"
    history = ""
    if doc.exists():
        text = doc.read_text()
        marker = "## Profiling notes"
        history = text[text.index(marker) :] if marker in text else ""
    doc.write_text(render(results, history))
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
