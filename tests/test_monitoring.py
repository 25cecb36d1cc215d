"""The shipped monitoring (docs/monitoring/alerts.yml, dashboard.json) only uses what a real daemon exports."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import serving
from tests.support.daemon import Daemon, cli, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver
from watcher.simulator import Simulator, SimulatorServer

MONITORING = Path(__file__).resolve().parent.parent / "docs" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "dashboard.json"

# Series Prometheus writes itself for every target, and the labels it attaches to every series.
SYNTHETIC_SERIES = frozenset({"up"})
TARGET_LABELS = frozenset({"instance", "job"})
# What issue 13 asks the rules to cover, by the alert that covers it.
REQUIRED_ALERTS = {
    "poll failing": "ConvertrWatcherPollFailing",
    "cursor lag": "ConvertrWatcherCursorLag",
    "sink failing": "ConvertrWatcherSinkFailing",
    "sink disabled": "ConvertrWatcherSinkDisabled",
    "dead letters growing": "ConvertrWatcherDeadLetters",
    "request budget near the limit": "ConvertrWatcherRequestBudgetNearLimit",
    # What a bad day shows: each such metric has an alert, and dead letters one that stays while they wait.
    "a refused reload": "ConvertrWatcherConfigReloadFailed",
    "stranded deliveries": "ConvertrWatcherOutboxStranded",
    "unreadable leads": "ConvertrWatcherUnreadableLeads",
    "memory near MemoryMax": "ConvertrWatcherMemoryNearLimit",
    "no daemon leads a shared state": "ConvertrWatcherNoLeader",
}
# Series an alert must read, by alert: the dead-letter alert on the gauge of dead deliveries waiting.
REQUIRED_SERIES = {
    "ConvertrWatcherDeadLetters": "watcher_outbox_dead",
    "ConvertrWatcherConfigReloadFailed": "watcher_config_reload_failed",
    "ConvertrWatcherOutboxStranded": "watcher_outbox_stranded",
    "ConvertrWatcherUnreadableLeads": "watcher_unreadable_leads",
    "ConvertrWatcherMemoryNearLimit": "process_resident_memory_bytes",
    "ConvertrWatcherNoLeader": "watcher_leader",
}
# Grafana's built-in interval variables, replaced by a duration PromQL accepts.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b")


# --- a small PromQL reader: which series, labels and label values an expression names ---------


_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<matchers>\{[^}]*\})
    |(?P<range>\[[^\]]*\])
    |(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)(?:ms|[smhdwy])*)
    |(?P<ident>[A-Za-z_:][\w:]*)
    |(?P<space>\s+)
    |(?P<other>.)
    """,
    re.X | re.S,
)
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
# Words that are never series names: binary operators, modifiers, and aggregations (which are
# followed by `by`/`without` rather than a parenthesis when grouped first).
_OPERATORS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk"}
_KEYWORDS = frozenset(_OPERATORS | _AGGREGATIONS | {"quantile", "inf", "nan"})
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]]  # (label, operator, value)


@dataclass
class Uses:
    selectors: list[Selector] = field(default_factory=list)
    grouping_labels: set[str] = field(default_factory=set)


def promql_uses(expr: str) -> Uses:
    """The series selectors and grouping labels of a PromQL expression (Grafana variables allowed)."""
    expr = GRAFANA_INTERVALS.sub("5m", expr)
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr) if m.lastgroup != "space"]
    depth = {"(": 0}
    for kind, text in tokens:
        if kind == "other" and text in "()":
            depth["("] += 1 if text == "(" else -1
            assert depth["("] >= 0, f"unbalanced parentheses in {expr!r}"
        assert kind != "other" or text not in "{}[]", f"stray {text!r} in {expr!r}"
    assert depth["("] == 0, f"unbalanced parentheses in {expr!r}"
    uses = Uses()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and text in _GROUPING and following == ("other", "("):
            i += 2
            while tokens[i] != ("other", ")"):
                if tokens[i][0] == "ident":
                    uses.grouping_labels.add(tokens[i][1])
                i += 1
        elif kind == "ident" and following != ("other", "(") and text not in _KEYWORDS:
            matchers: list[tuple[str, str, str]] = []
            if following[0] == "matchers":
                body = following[1][1:-1]
                for m in _MATCHER.finditer(body):
                    matchers.append((m.group(1), m.group(2), m.group(3)))
                assert ",".join(f'{k}{op}"{v}"' for k, op, v in matchers) == re.sub(r"\s+", "", body).rstrip(","), (
                    f"unreadable matchers {following[1]!r} in {expr!r}"
                )
                i += 1
            uses.selectors.append(Selector(text, matchers))
        i += 1
    return uses


# --- what the shipped files contain -------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]\w*)\)", query)
        assert match, f"variable {variable['name']}: only label_values(series, label) is understood: {query!r}"
        # The variable reads the label's values off the series: the same demand as grouping by it.
        found.append((f"variable {variable['name']!r}", f"group by ({match.group(2)}) ({match.group(1)})"))
    return found


def every_expression() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()] + dashboard_queries()


# --- a real daemon's /metrics ---------------------------------------------------------------------


@dataclass
class Scrape:
    labels: dict[str, set[str]]  # sample name -> label names seen on it
    values: dict[tuple[str, str], set[str]]  # (sample name, label) -> values seen


def scrape(port: int) -> Scrape:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        conn.close()
    out = Scrape({}, {})
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.labels.setdefault(sample.name, set()).update(sample.labels)
            for label, value in sample.labels.items():
                out.values.setdefault((sample.name, label), set()).add(value)
    return out


def problems(uses: Uses, seen: Scrape) -> list[str]:
    """Each series, label or label value `uses` names that the scrape lacks."""
    out: list[str] = []
    names: set[str] = set()
    for selector in uses.selectors:
        if selector.name in SYNTHETIC_SERIES:
            continue
        if selector.name not in seen.labels:
            out.append(f"series {selector.name} is not exported")
            continue
        names.add(selector.name)
        for label, op, value in selector.matchers:
            if label in TARGET_LABELS:
                continue
            if label not in seen.labels[selector.name]:
                out.append(f"{selector.name} has no label {label}")
                continue
            if op == "=":
                wanted = {value}
            elif op == "=~" and re.fullmatch(r"[\w.-]+(\|[\w.-]+)*", value):
                wanted = set(value.split("|"))  # a plain alternation such as dead|disabled
            else:
                continue  # negative matchers and real regexes name no value that must exist
            missing = sorted(wanted - seen.values.get((selector.name, label), set()))
            if missing:
                out.append(f'{selector.name}{{{label}{op}"{value}"}}: no series has {label} {missing}')
    grouping = uses.grouping_labels - TARGET_LABELS
    available = set().union(*(seen.labels[n] for n in names)) if names else set()
    out += [f"grouping label {label} is on none of {sorted(names)}" for label in sorted(grouping - available)]
    return out


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    with serving(seed=5, campaigns=2, leads=6) as pair:
        yield pair


def _metrics_port(daemon: Daemon) -> int:
    def port() -> int | None:
        for line in daemon.log().splitlines():
            if "metrics endpoint listening" in line:
                return int(json.loads(line)["port"])
        return None

    found: int = wait_until(port, 20, "the metrics endpoint")
    return found


# --- tests ------------------------------------------------------------------------------------------


def test_rules_and_dashboard_use_only_what_a_running_daemon_exports(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """Every series, matcher label and label value in the alert rules and the dashboard exists on the /metrics of
    a real daemon that has polled, detected a new and an updated lead, and delivered them, with the queue of a
    removed sink stranded in its state."""
    simulator, server = sim
    # A sink that failed its first attempts, then left the configuration: its events are stranded.
    with Receiver() as first, Receiver() as gone:
        gone.respond(500)
        old = [webhook_sink(first.url), webhook_sink(gone.url, "old", retry_schedule=["1h"])]
        write_config(tmp_path, server.url, old, leads={"start": "2000-01-01T00:00:00Z"})
        assert cli("once", "-c", str(tmp_path / "config.toml")).returncode == 1
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url)],
        leads={"updates": True},
        campaigns={"enabled": True, "interval": 1},
        extra='\n[metrics]\nlisten = "127.0.0.1:0"\n',
    )
    expressions = every_expression()
    with Daemon(config) as daemon:
        port = _metrics_port(daemon)
        daemon.wait_polls(1)
        lead = simulator.add_lead(simulator.campaign_ids()[0])["id"]
        receiver.wait_for(lambda reqs: any(r.json()["type"] == "lead.created" for r in reqs), 20, "lead.created")
        simulator.update_lead(lead, score=42)
        receiver.wait_for(lambda reqs: any(r.json()["type"] == "lead.updated" for r in reqs), 20, "lead.updated")

        def missing() -> list[str]:
            seen = scrape(port)
            return [f"{where}: {p}" for where, expr in expressions for p in problems(promql_uses(expr), seen)]

        # Labelled series appear as the daemon first touches them: wait for them, then name what is missing.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not missing(), 20, "every series the rules and dashboard use")
        assert missing() == []
        assert daemon.stop() == 0


def test_rules_cover_what_operators_need_and_are_well_formed() -> None:
    """alerts.yml has an alert for each failure issue 13 names, each with an expression, a severity and a summary."""
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    for need, alert in REQUIRED_ALERTS.items():
        assert alert in names, f"no alert for {need}"
    for alert, series in REQUIRED_SERIES.items():
        [rule] = [r for r in rules if r["alert"] == alert]
        assert series in {s.name for s in promql_uses(rule["expr"]).selectors}, f"{alert} does not read {series}"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert promql_uses(rule["expr"]).selectors, f"{rule['alert']} reads no series"
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    """dashboard.json has a uid, a datasource variable, unique panel ids, and a Prometheus query on every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']} ignores the instance picker"
    used = {s.name for _where, expr in dashboard_queries() for s in promql_uses(expr).selectors}
    assert {"watcher_poll_runs_total", "watcher_deliveries_total", "watcher_api_requests_total"} <= used


@pytest.mark.parametrize(
    ("expr", "series", "grouping"),
    [
        (
            'sum by (sink) (increase(watcher_deliveries_total{outcome="dead"}[1h])) > 0',
            [("watcher_deliveries_total", [("outcome", "=", "dead")])],
            {"sink"},
        ),
        (
            "histogram_quantile(0.95, sum by (stream, le) (rate(watcher_poll_duration_seconds_bucket"
            '{instance=~"$instance"}[$__rate_interval])))',
            [("watcher_poll_duration_seconds_bucket", [("instance", "=~", "$instance")])],
            {"stream", "le"},
        ),
        (
            "watcher_build_info unless on (instance, job) watcher_last_successful_poll_timestamp_seconds",
            [("watcher_build_info", []), ("watcher_last_successful_poll_timestamp_seconds", [])],
            {"instance", "job"},
        ),
        (
            'time() - watcher_cursor_lag_seconds{stream="leads.created", x!~"a|b"} offset 5m > 1e3',
            [("watcher_cursor_lag_seconds", [("stream", "=", "leads.created"), ("x", "!~", "a|b")])],
            set(),
        ),
    ],
)
def test_promql_reader_finds_series_labels_and_values(
    expr: str, series: list[tuple[str, list[tuple[str, str, str]]]], grouping: set[str]
) -> None:
    """The expression reader the checks rely on names exactly the series, matchers and grouping labels used."""
    uses = promql_uses(expr)
    assert [(s.name, s.matchers) for s in uses.selectors] == series
    assert uses.grouping_labels == grouping


def test_a_misspelt_series_label_or_value_is_reported() -> None:
    """The check is not vacuous: a wrong series name, label name or label value each produces a problem."""
    seen = Scrape(
        labels={"watcher_deliveries_total": {"sink", "outcome"}},
        values={
            ("watcher_deliveries_total", "outcome"): {"success", "dead"},
            ("watcher_deliveries_total", "sink"): {"crm"},
        },
    )
    assert problems(promql_uses('watcher_deliveries_total{outcome="dead"}'), seen) == []
    assert problems(promql_uses("watcher_delivery_total"), seen) == ["series watcher_delivery_total is not exported"]
    assert problems(promql_uses('watcher_deliveries_total{result="dead"}'), seen) == [
        "watcher_deliveries_total has no label result"
    ]
    assert problems(promql_uses('watcher_deliveries_total{outcome="died"}'), seen) == [
        "watcher_deliveries_total{outcome=\"died\"}: no series has outcome ['died']"
    ]
    assert problems(promql_uses('watcher_deliveries_total{outcome=~"dead|gone"}'), seen) == [
        "watcher_deliveries_total{outcome=~\"dead|gone\"}: no series has outcome ['gone']"
    ]
    assert problems(promql_uses("sum by (stream) (watcher_deliveries_total)"), seen) == [
        "grouping label stream is on none of ['watcher_deliveries_total']"
    ]


def _gauge(port: int, name: str, **labels: str) -> float | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def test_dead_deliveries_gauge_stays_until_a_replay(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """watcher_outbox_dead counts the dead deliveries waiting, minutes after they died, and drops once replayed."""
    simulator, server = sim
    receiver.respond(500)
    config = write_config(
        tmp_path, server.url, [webhook_sink(receiver.url)], extra='\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    with Daemon(config) as daemon:
        port = _metrics_port(daemon)
        daemon.wait_polls(1)
        simulator.add_lead(simulator.campaign_ids()[0])
        # Two attempts (the schedule is one 1 s retry), then dead; the gauge follows at the next poll.
        wait_until(lambda: _gauge(port, "watcher_outbox_dead", sink="crm") == 1, 30, "one dead delivery counted")
        daemon.wait_polls(2)
        assert _gauge(port, "watcher_outbox_dead", sink="crm") == 1, "still dead, still counted"
        receiver.respond(200)
        assert cli("replay", "-c", str(config), "--sink", "crm").returncode == 0
        wait_until(lambda: _gauge(port, "watcher_outbox_dead", sink="crm") == 0, 30, "the replayed delivery uncounted")
        assert daemon.stop() == 0
