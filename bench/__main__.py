"""`make bench`: run every measurement, write bench/results.json and docs/benchmarks.md.

    python -m bench [--runs N] [--quick]

--quick uses smaller sizes (for a smoke run); the published figures come from a full run.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import cases

ROOT = Path(__file__).resolve().parent.parent


def run(runs: int, quick: bool) -> dict[str, Any]:
    from watcher.logs import configure_logging

    configure_logging("warning", "json")
    small, large = (2_000, 20_000) if quick else (10_000, 100_000)
    results: dict[str, Any] = {"machine": cases.machine(), "runs": runs, "quick": quick}
    t0 = time.monotonic()

    print(f"ingest: {large} leads, {runs} runs each (daemon path vs plain httpx walk)", flush=True)
    ingest = cases.ingest(large, runs)
    results["ingest_ratio"] = ingest["ratio"]
    results["ingest_leads_per_s"] = ingest["daemon_leads_per_s"]
    results["ingest_plain_leads_per_s"] = ingest["plain_leads_per_s"]
    results["ingest_warm_ratio"] = ingest["warm_ratio"]
    results["ingest_warm_leads_per_s"] = ingest["warm_daemon_leads_per_s"]
    results["ingest_warm_plain_leads_per_s"] = ingest["warm_plain_leads_per_s"]

    n_events = 2_000 if quick else 10_000
    print(f"dispatch: {n_events} events, {runs} runs each (dispatcher vs plain signed POSTs)", flush=True)
    dispatch = cases.dispatch(n_events, runs)
    results["dispatch_ratio"] = dispatch["ratio"]
    results["dispatch_events_per_s"] = dispatch["daemon_events_per_s"]
    results["dispatch_plain_events_per_s"] = dispatch["plain_events_per_s"]

    n_latency = 100 if quick else 500
    print(f"latency: {n_latency} leads at a 2 s lead interval", flush=True)
    lat = cases.latency(n_latency)
    results["latency_interval_s"] = lat["interval_s"]
    results["latency_p50_s"] = lat["p50_s"]
    results["latency_p99_s"] = lat["p99_s"]
    results["latency_leads"] = lat["leads"]

    print(f"memory and state size: backfills of {small} and {large} leads with updates on", flush=True)
    a = cases.backfill_process(small)
    b = cases.backfill_process(large)
    results["rss_mb_10k"] = a["rss_mb"]
    results["rss_mb_100k"] = b["rss_mb"]
    results["rss_growth"] = b["rss_mb"] / a["rss_mb"] - 1
    results["state_bytes_per_lead"] = b["state_bytes_per_lead"]

    print("API cost of an idle poll cycle", flush=True)
    cost = cases.api_cost()
    results["idle_requests_leads"] = cost["leads_created"]
    results["idle_requests_leads_updated"] = cost["leads_updated"]
    results["idle_requests_campaigns"] = cost["campaigns"]
    results["idle_campaign_pages"] = cost["campaign_pages"]
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
]


def render(results: dict[str, Any], previous: str) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`python -m bench`), which writes `bench/results.json` and this table.",
        "Every ratio is measured inside one run against a plain baseline on the same machine, so machine",
        "noise cancels; absolute figures are for the record only.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}.",
        f"Measured {results['measured_at']}; ingest and dispatch are the median of {results['runs']} runs each;"
        f" total {results['seconds']} s{' (quick sizes)' if results['quick'] else ''}.",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    for key, label, target, ok in TARGETS:
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
        "  log, one transaction per outcome) to a loopback receiver in its own process, against a plain",
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
    ]
    if previous.strip():
        lines += ["", previous.strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    parser.add_argument("--render-only", action="store_true", help="rewrite docs/benchmarks.md from results.json")
    args = parser.parse_args()
    if args.render_only:
        results = json.loads((ROOT / "bench" / "results.json").read_text())
    else:
        results = run(args.runs, args.quick)
        (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
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
