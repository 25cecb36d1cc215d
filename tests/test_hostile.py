"""Hostile Convertr answers (huge, deep, wrong types, missing fields, bad UTF-8, NaN): a classified error or a skip."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watcher.clock import SystemClock
from watcher.config import ConvertrConfig
from watcher.convertr import ConvertrClient, is_last, parse_collection
from watcher.detect import LeadWalk, decide_campaigns, decide_created, decide_updated, diff, snapshot
from watcher.errors import MalformedResponse, TransientError, WatcherError
from watcher.events import dumps, loads
from watcher.records import CampaignState, LeadState

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON as a hostile server could write it: every type anywhere, huge integers, odd keys.
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
TIMES = st.sampled_from(["2026-11-26T18:35:39+00:00", "2026-13-45T99:00:00+00:00", "", "yesterday", "2026-11-26"])
LEAD_KEYS = ["id", "createdTs", "updatedTs", "score", "qaResult", "leadData", "email", "campaign", "@context"]
lead_docs = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(min_value=-1, max_value=2**70) | json_values,
        "createdTs": TIMES | json_values,
        "updatedTs": TIMES | json_values,
        "score": json_values,
        "qaResult": json_values,
        "leadData": json_values
        | st.lists(st.fixed_dictionaries({}, optional={"name": json_values, "value": json_values}), max_size=3),
        "email": json_values,
        "campaign": st.sampled_from(["/api/v4/campaigns/601", "/api/v4/campaigns/x", ""]) | json_values,
        "@context": json_values,
    },
)
campaign_docs = st.fixed_dictionaries(
    {}, optional={"id": st.integers(-1, 2**70) | json_values, "status": json_values, "name": json_values}
)
TRACK = ("score", "qaResult", "email", "leadData")


def _walk(stream: str) -> LeadWalk:
    return LeadWalk(
        stream, now=1.8e9, detected_at="2027-01-15T08:00:00.000Z", signpost=1.9e9, track=TRACK, updates=True
    )


def _route(_event: object) -> list[str]:
    return ["crm"]


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_parse_collection_classifies_any_body(raw: bytes) -> None:
    """Any bytes as a collection answer: a page, or MalformedResponse (the client maps bad JSON to it too)."""
    try:
        body = loads(raw)
    except ValueError:
        return  # ConvertrClient._json raises MalformedResponse for exactly this
    try:
        page, has_view = parse_collection(body, 1, 100, None, "/api/v4/leads")
    except MalformedResponse:
        return
    is_last(page, has_view, 100)


@FUZZ
@given(json_values, st.sampled_from(["member", "hydra:member"]), json_values, json_values)
def test_parse_collection_with_hostile_fields(members: Any, key: str, total: Any, view: Any) -> None:
    """Wrong types for member, totalItems and view: a page or MalformedResponse, never another exception."""
    body = {key: members, "hydra:totalItems": total, "hydra:view": view, "hydra:search": view}
    try:
        page, has_view = parse_collection(body, 2, 50, None, "/api/v4/leads")
    except MalformedResponse:
        return
    is_last(page, has_view, 50)


@FUZZ
@given(st.lists(lead_docs, max_size=6), st.lists(lead_docs, max_size=3))
def test_lead_decisions_never_crash(members: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> None:
    """Hostile lead documents: decided or skipped, and everything committed encodes as JSON."""
    known: dict[int, LeadState] = {}
    for doc in earlier:
        if isinstance(doc.get("id"), int) and not isinstance(doc.get("id"), bool):
            known[doc["id"]] = LeadState(doc["id"], 1.0, None, snapshot(doc, TRACK), None)
    for commit in (
        decide_created(members, known, _walk("leads.created"), None, _route),
        decide_updated(members, known, _walk("leads.updated"), None, _route),
    ):
        for event, _sinks in commit.events:
            dumps(event.envelope())
        for lead in commit.leads:
            dumps(lead.snapshot)
    for a in members:
        for b in earlier:
            diff(snapshot(b, TRACK), snapshot(a, TRACK), TRACK, TRACK)


@FUZZ
@given(st.lists(campaign_docs, max_size=6), st.booleans())
def test_campaign_decisions_skip_what_they_cannot_read(docs: list[dict[str, Any]], baseline: bool) -> None:
    """Hostile campaign documents: decided, or skipped with a warning that names the problem."""
    known = {601: CampaignState(601, "Active", 0, "Blue")}
    commit, warnings = decide_campaigns(
        docs, known, baseline=baseline, now=1.8e9, detected_at="2027-01-15T08:00:00.000Z", route=_route
    )
    for event, _sinks in commit.events:
        dumps(event.envelope())
    bad = [d for d in docs if not (isinstance(d.get("id"), int) and not isinstance(d.get("id"), bool))]
    assert len(warnings) >= len(bad)


# --- over a real loopback server -------------------------------------------------------------

DEEP = b"[" * 50_000 + b"]" * 50_000  # under the 128 KiB cap below, far past any sane depth
HOSTILE = {
    "invalid UTF-8": b'{"hydra:member": [{"id": 1, "email": "\xff\xfe"}]}',
    "NaN": b'{"hydra:member": [{"id": 1, "score": NaN}], "hydra:totalItems": 1}',
    "deeply nested": DEEP,
    "members not objects": b'{"hydra:member": [1, "two", null]}',
    "no member list": b'{"hydra:totalItems": 5}',
    "a list, not an object": b"[]",
    "truncated": b'{"hydra:member": [{"id": 1',
    "huge": b'{"hydra:member": [' + b",".join([b'{"id": 1, "x": "' + b"a" * 1000 + b'"}'] * 200) + b"]}",
}


class _Hostile(BaseHTTPRequestHandler):
    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(b'{"access_token": "tok", "expires_in": 3600}')

    def do_GET(self) -> None:
        self._send(self.server.body)  # type: ignore[attr-defined]

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/ld+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hostile_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_client_classifies_hostile_pages(hostile_server: ThreadingHTTPServer, name: str) -> None:
    """Each hostile answer over loopback ends in a TransientError subclass (retried), never a crash."""
    hostile_server.body = HOSTILE[name]  # type: ignore[attr-defined]
    port = hostile_server.server_address[1]
    config = ConvertrConfig(
        base_url=f"http://127.0.0.1:{port}", username="u", password="p", max_response_bytes=128 * 1024
    )

    async def scenario() -> object:
        async with ConvertrClient(config, clock=SystemClock()) as client:
            try:
                return await client.page("leads", attempts=1)
            except WatcherError as exc:
                return exc

    outcome = asyncio.run(scenario())
    # "huge" passes max_response_bytes (ResponseTooLarge); every other one is not the page expected.
    expected = TransientError if name == "huge" else MalformedResponse
    assert isinstance(outcome, expected), outcome
