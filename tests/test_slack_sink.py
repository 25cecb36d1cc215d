"""Slack messages: Block Kit within Slack's limits for every event, digests, and Slack's answers."""

from __future__ import annotations

import asyncio
import json
import re
import traceback
from collections.abc import Awaitable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from tests.support.receiver import FakeSlack
from watcher import __version__
from watcher.clock import FakeClock, rfc3339
from watcher.config import SinkConfig
from watcher.errors import DeliveryError, SinkGone, StateError, Throttled
from watcher.events import (
    CAMPAIGN_CREATED,
    CAMPAIGN_STATUS_CHANGED,
    LEAD_CREATED,
    LEAD_UPDATED,
    WATCHER_TEST,
    Event,
    event_id,
)
from watcher.sinks import build_sink
from watcher.sinks.base import Attempt
from watcher.sinks.slack import GONE_ERRORS, SlackSink, render_digest, render_message

T = TypeVar("T")
HOOK_TOKEN = "abcdefghijklmnopqrstuvwx"
WHEN = 1_714_557_600.0  # 2024-05-01 10:00:00 UTC

LEAD: dict[str, Any] = {
    "@id": "/api/v4/leads/42",
    "id": 42,
    "firstName": "Ada",
    "lastName": "Lovelace",
    "email": "ada@example.org",
    "telephone": "+44 20 7946 0000",
    "campaign": "/api/v4/campaigns/601",
    "qaResult": {"@id": "/api/v4/qa-results/9", "status": "Valid"},
    "score": 80,
    "maxScore": 100,
    "leadData": [{"name": "email", "value": "ada@example.org"}],
}
CAMPAIGN: dict[str, Any] = {"id": 601, "name": "Spring Launch", "status": "Active", "startTs": "2024-05-01"}
PERSONAL = ("Ada", "Lovelace", "ada@example.org", "old@example.org", "7946", "+44 7700")


def event(type_: str, data: dict[str, Any], resource: str = "lead:42", n: int = 0, when: float = WHEN) -> Event:
    return Event(
        id=event_id(type_, resource, f"v{n}"),
        type=type_,
        timestamp=rfc3339(when),
        data=data,
        resource=resource,
        campaign_id=601 if resource != "sink:team" else None,
    )


def lead_updated(changes: dict[str, Any], n: int = 0) -> Event:
    return event(LEAD_UPDATED, {"lead": LEAD, "changes": changes}, n=n)


EVENTS = {
    LEAD_CREATED: event(LEAD_CREATED, {"lead": LEAD}),
    LEAD_UPDATED: lead_updated(
        {
            "qaResult.status": {"from": "Pending", "to": "Valid"},
            "email": {"from": "old@example.org", "to": "ada@example.org"},
            "leadData.mobile": {"from": None, "to": "+44 7700 900000"},
        }
    ),
    CAMPAIGN_CREATED: event(CAMPAIGN_CREATED, {"campaign": CAMPAIGN}, "campaign:601"),
    CAMPAIGN_STATUS_CHANGED: event(
        CAMPAIGN_STATUS_CHANGED,
        {"campaign": {**CAMPAIGN, "status": "Paused"}, "from": "Active", "to": "Paused"},
        "campaign:601",
    ),
    WATCHER_TEST: event(WATCHER_TEST, {"sink": "team"}, "sink:team"),
    "lead.deleted": event("lead.deleted", {"lead": {"id": 42}}),
}

# --- an independent reading of Slack's documented limits ------------------------------------


def texts(message: dict[str, Any]) -> Iterator[str]:
    yield message["text"]
    for block in message["blocks"]:
        if "text" in block:
            yield block["text"]["text"]
        for item in block.get("fields", []) + block.get("elements", []):
            yield item["text"]


def assert_within_limits(message: dict[str, Any]) -> None:
    assert isinstance(message["text"], str) and 0 < len(message["text"]) <= 4000
    blocks = message["blocks"]
    assert 0 < len(blocks) <= 50
    for block in blocks:
        if block["type"] == "header":
            assert block["text"]["type"] == "plain_text"
            assert 0 < len(block["text"]["text"]) <= 150
        elif block["type"] == "section":
            assert "text" in block or "fields" in block
            if "text" in block:
                assert 0 < len(block["text"]["text"]) <= 3000
            fields = block.get("fields", [])
            assert len(fields) <= 10
            assert all(0 < len(f["text"]) <= 2000 for f in fields)
        elif block["type"] == "context":
            assert 0 < len(block["elements"]) <= 10
            assert all(0 < len(e["text"]) <= 3000 for e in block["elements"])
        else:
            raise AssertionError(f"unexpected block type {block['type']}")
    for text in texts(message):
        assert "<" not in text and ">" not in text, text
        assert not re.search(r"&(?!amp;|lt;|gt;)", text), text


def field_texts(message: dict[str, Any]) -> list[str]:
    return [f["text"] for b in message["blocks"] for f in b.get("fields", [])]


def header(message: dict[str, Any]) -> str:
    return str(message["blocks"][0]["text"]["text"])


# --- rendering ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "want_header", "want_fields", "want_text"),
    [
        (
            LEAD_CREATED,
            "New lead 42",
            ["*Lead*\n42", "*Campaign*\n601", "*QA result*\nValid", "*Score*\n80/100"],
            "lead.created: New lead 42 in campaign 601",
        ),
        (
            LEAD_UPDATED,
            "Lead 42 updated: 3 fields changed",
            [
                "*Lead*\n42",
                "*qaResult.status*\nPending → Valid",
                "*email*\n_changed (personal data hidden)_",
                "*leadData.mobile*\n_changed (personal data hidden)_",
            ],
            "lead.updated: Lead 42 updated: qaResult.status, email, leadData.mobile",
        ),
        (
            CAMPAIGN_CREATED,
            "New campaign: Spring Launch (601)",
            ["*Campaign*\nSpring Launch (601)", "*Status*\nActive", "*Starts*\n2024-05-01"],
            "campaign.created: New campaign Spring Launch (601) (Active)",
        ),
        (
            CAMPAIGN_STATUS_CHANGED,
            "Campaign Spring Launch (601) is now Paused",
            ["*Campaign*\nSpring Launch (601)", "*Status*\nActive → *Paused*"],
            "campaign.status_changed: Campaign Spring Launch (601): Active → Paused",
        ),
        (WATCHER_TEST, "convertr-watcher test message", [], "watcher.test: Test message for sink team"),
        ("lead.deleted", "lead.deleted", [], "lead.deleted: lead.deleted for lead:42"),
    ],
)
def test_render_message(type_: str, want_header: str, want_fields: list[str], want_text: str) -> None:
    """Each event type gets a header saying what happened, its fields, a fallback text and a context line."""
    ev = EVENTS[type_]
    message = render_message(ev)
    assert_within_limits(message)
    assert header(message) == want_header
    assert set(want_fields) <= set(field_texts(message))
    assert message["text"] == want_text
    context = message["blocks"][-1]
    assert context["type"] == "context"
    assert context["elements"][0]["text"] == f"{ev.id} · 2024-05-01 10:00:00 UTC"


def test_no_personal_data_by_default_values_with_include_pii() -> None:
    """By default no name, email or phone appears anywhere; include_pii shows the changed values."""
    for ev in EVENTS.values():
        dumped = json.dumps(render_message(ev), ensure_ascii=False)
        assert not [p for p in PERSONAL if p in dumped], ev.type
    dumped = json.dumps(render_digest(list(EVENTS.values())), ensure_ascii=False)
    assert not [p for p in PERSONAL if p in dumped]
    shown = field_texts(render_message(EVENTS[LEAD_UPDATED], include_pii=True))
    assert "*email*\nold@example.org → ada@example.org" in shown


def test_huge_changes_stay_within_limits() -> None:
    """Hundreds of changed fields with long values: 10 fields at most, the rest counted."""
    changes = {f"field{i}": {"from": "x" * 10_000, "to": "<&>" * 3000} for i in range(500)}
    message = render_message(lead_updated(changes))
    assert_within_limits(message)
    change_fields = message["blocks"][2]["fields"]
    assert len(change_fields) == 10
    assert change_fields[-1]["text"].startswith("*…and 491 more*\nfield9, field10")
    assert header(message) == "Lead 42 updated: 500 fields changed"


def test_long_names_and_odd_values_are_clipped_and_escaped() -> None:
    """Campaign names, statuses and values cannot break limits or inject links and mentions."""
    nasty = "<!channel> & <https://evil.example|click> " * 50
    ev = event(
        CAMPAIGN_STATUS_CHANGED,
        {"campaign": {"id": 601, "name": nasty}, "from": nasty, "to": "A&B"},
        "campaign:601",
    )
    message = render_message(ev)
    assert_within_limits(message)
    assert "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in header(message)
    assert header(message).endswith("…")
    odd = lead_updated({"notes": {"from": {"a": [1, 2]}, "to": None}, "flag": {"from": True, "to": ""}})
    fields = field_texts(render_message(odd))
    assert '*notes*\n{"a":[1,2]} → (empty)' in fields
    assert "*flag*\ntrue → (empty)" in fields


def test_lead_without_campaign_or_qa() -> None:
    """A sparse lead renders only what is known."""
    ev = Event(id="evt_x1", type=LEAD_CREATED, timestamp="not a time", data={"lead": {"id": 7}}, resource="lead:7")
    message = render_message(ev)
    assert_within_limits(message)
    assert field_texts(message) == ["*Lead*\n7"]
    assert message["blocks"][-1]["elements"][0]["text"] == "evt_x1 · not a time"


def mixed(n: int) -> list[Event]:
    types = [LEAD_CREATED, LEAD_UPDATED, CAMPAIGN_STATUS_CHANGED]
    out = []
    for i in range(n):
        t = types[i % 3]
        data: dict[str, Any] = {"lead": {**LEAD, "id": 1000 + i}}
        if t == LEAD_UPDATED:
            data["changes"] = {"score": {"from": 1, "to": 2}, "email": {"from": "a", "to": "b"}}
        if t == CAMPAIGN_STATUS_CHANGED:
            data = {"campaign": CAMPAIGN, "from": "Paused", "to": "Active"}
        out.append(event(t, data, f"lead:{1000 + i}", n=i, when=WHEN + i))
    return out


def test_digest_of_30_events_counts_and_lists_every_id() -> None:
    """One message: a count per type and one line per event with its id, in type order."""
    events = mixed(30)
    message = render_digest(events)
    assert_within_limits(message)
    assert header(message) == "30 Convertr changes"
    assert message["text"] == "30 Convertr changes: 10 lead.created, 10 lead.updated, 10 campaign.status_changed"
    assert message["blocks"][1]["text"]["text"] == (
        "*lead.created*: 10 · *lead.updated*: 10 · *campaign.status_changed*: 10"
    )
    assert all(e.id in json.dumps(message) for e in events)
    updated = message["blocks"][3]["text"]["text"].split("\n")
    assert updated[0] == "*lead.updated* (10)"
    assert updated[1] == f"• Lead 1001 updated: score, email · `{events[1].id}`"
    assert len(updated) == 11
    assert message["blocks"][-1]["elements"][0]["text"] == (
        "30 events · 2024-05-01 10:00:00 UTC – 2024-05-01 10:00:29 UTC"
    )


def test_digest_of_thousands_and_of_many_types_stays_within_limits() -> None:
    """Lists that cannot fit end in '…and N more'; many distinct types still fit in 50 blocks."""
    message = render_digest(mixed(3000))
    assert_within_limits(message)
    assert "more" in message["blocks"][2]["text"]["text"].rsplit("\n", 1)[-1]
    many = [event(f"custom.type{i}", {}, f"x:{i}", n=i) for i in range(80)]
    message = render_digest(many)
    assert_within_limits(message)
    assert len(message["blocks"]) == 50
    assert message["blocks"][-2]["text"]["text"] == "…and 34 more events of 34 other types"


# --- delivery ----------------------------------------------------------------------------


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def config(url: str, **kw: Any) -> SinkConfig:
    kw.setdefault("include_pii", False)
    kw.setdefault("timeout", 5.0)
    return SinkConfig(name="team", type="slack", url=url, **kw)


async def deliver(cfg: SinkConfig, events: list[Event]) -> Attempt:
    sink = build_sink(cfg, clock=FakeClock(), version=__version__)
    try:
        return await sink.deliver(events)
    finally:
        await sink.aclose()


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


def test_one_event_posts_its_message(slack: FakeSlack) -> None:
    """A single event is posted as its rendered message; Slack's `ok` is the attempt's excerpt."""
    ev = EVENTS[LEAD_UPDATED]
    attempt = run(deliver(config(slack.url), [ev]))
    assert (attempt.status, attempt.response_excerpt) == (200, "ok")
    [req] = slack.requests
    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"] == f"convertr-watcher/{__version__}"
    assert slack.messages() == [render_message(ev)]
    assert not [p for p in PERSONAL if p in req.body.decode()]


def test_a_batch_posts_one_digest(slack: FakeSlack) -> None:
    """Several events go out as a single digest message."""
    events = mixed(30)
    run(deliver(config(slack.url), events))
    assert slack.messages() == [render_digest(events)]
    assert len(slack.arrival_times()) == 1


def deliver_each(sink: Any, batches: list[list[Event]]) -> None:
    async def go() -> None:
        try:
            for batch in batches:
                await sink.deliver(batch)
        finally:
            await sink.aclose()

    run(go())


def test_a_lead_names_its_campaign_from_the_watchers_records(slack: FakeSlack) -> None:
    """A lead carries only its campaign's IRI: the sink looks the name up, once per message that needs it."""
    lookups: list[int] = []

    def names() -> dict[int, str]:
        lookups.append(1)
        return {601: "Spring Launch"}

    sink = build_sink(config(slack.url), clock=FakeClock(), version=__version__, campaign_names=names)
    given = replace(EVENTS[LEAD_CREATED], extra={"campaign_name": "Named Already"})
    deliver_each(sink, [[EVENTS[LEAD_CREATED]], mixed(5), [EVENTS[CAMPAIGN_CREATED]], [given]])
    lead, digest, campaign, named = slack.messages()
    assert "*Campaign*\nSpring Launch (601)" in field_texts(lead)
    assert "New lead 42 in campaign Spring Launch (601)" in lead["text"]
    assert "in campaign Spring Launch (601)" in json.dumps(digest)
    assert "*Campaign*\nSpring Launch (601)" in field_texts(campaign)  # from the campaign document itself
    assert "*Campaign*\nNamed Already (601)" in field_texts(named)
    assert len(lookups) == 2, "one lookup per message or digest with a lead in it, none otherwise"


def test_campaign_names_stay_out_of_the_way_when_they_cannot_help(slack: FakeSlack) -> None:
    """An unreadable state file leaves the campaign's id; a name holding an address is masked like any value."""

    def unreadable() -> dict[int, str]:
        raise StateError("state file: database disk image is malformed")

    sink = build_sink(config(slack.url), clock=FakeClock(), version=__version__, campaign_names=unreadable)
    deliver_each(sink, [[EVENTS[LEAD_CREATED]]])
    sink = build_sink(
        config(slack.url), clock=FakeClock(), version=__version__, campaign_names=lambda: {601: "Ask ada@example.org"}
    )
    deliver_each(sink, [[EVENTS[LEAD_CREATED]]])
    by_id, masked = slack.messages()
    assert "*Campaign*\n601" in field_texts(by_id)
    assert "ada@example.org" not in json.dumps(masked) and "Ask [personal data hidden] (601)" in field_texts(masked)[1]


def test_build_sink_pacing_and_batching() -> None:
    """A Slack sink batches up to 20 events and asks for a second between sends."""
    sink = build_sink(config("http://127.0.0.1:9/services/x"), clock=FakeClock(), version="0")
    assert isinstance(sink, SlackSink)
    assert (sink.max_batch, sink.min_interval) == (20, 1.0)
    with pytest.raises(ValueError):
        run(sink.deliver([]))
    run(sink.aclose())


GONE_STATUS = {
    "invalid_payload": 400,
    "user_not_found": 400,
    "action_prohibited": 403,
    "channel_not_found": 404,
    "channel_is_archived": 410,
    "no_service": 404,
    "no_active_hooks": 404,
    "invalid_token": 403,
    "no_team": 404,
    "team_disabled": 403,
}


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [(s, e, SinkGone) for e, s in GONE_STATUS.items()]
    + [
        (500, "rollup_error", DeliveryError),
        (500, "", DeliveryError),
        (502, "<html>bad gateway</html>", DeliveryError),
        (503, "", DeliveryError),
        (400, "some_new_error", DeliveryError),
        (410, "", SinkGone),
        (302, "", DeliveryError),
    ],
)
def test_slack_answers_are_classified(slack: FakeSlack, status: int, body: str, kind: type[DeliveryError]) -> None:
    """Revocation strings disable the sink; rollup_error, 5xx and unknown errors are retried."""
    slack.fail_with(body, status)
    with pytest.raises(DeliveryError) as info:
        run(deliver(config(slack.url), [EVENTS[WATCHER_TEST]]))
    error = info.value
    assert type(error) is kind
    assert error.status == status
    if re.fullmatch(r"[a-z_]+", body):
        assert body in str(error)
    text = str(error) + "".join(traceback.format_exception(error))
    assert HOOK_TOKEN not in text and "services" not in text and "html" not in text


def test_every_documented_revocation_string_is_known() -> None:
    """The list the sink disables on is exactly the documented set."""
    assert frozenset(GONE_STATUS) == GONE_ERRORS


@pytest.mark.parametrize(("headers", "retry_after"), [({"retry-after": "30"}, 30.0), ({}, None)])
def test_429_is_throttled_with_retry_after(
    slack: FakeSlack, headers: dict[str, str], retry_after: float | None
) -> None:
    """Slack's rate limit raises Throttled carrying its Retry-After seconds."""
    slack.fail_with("rate_limited", 429, headers)
    with pytest.raises(Throttled) as info:
        run(deliver(config(slack.url), [EVENTS[LEAD_CREATED]]))
    assert info.value.status == 429
    assert info.value.retry_after == retry_after
