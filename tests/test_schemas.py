"""The JSON Schemas shipped in `watcher/schemas/`: one per event type, valid draft 2020-12, accepting
every body the watcher builds (with and without personal data) and rejecting broken ones."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.support.schemas import schema_errors, validate_event, validator
from watcher import detect, schemas
from watcher.clock import FakeClock, rfc3339
from watcher.config import DEFAULT_TRACK, SinkConfig
from watcher.events import EVENT_TYPES, Event
from watcher.sendtest import test_event as build_test_event
from watcher.simulator import Simulator
from watcher.sinks.base import render_data

NOW = 1_795_000_000.0
DETECTED = rfc3339(NOW)

# One body per type, shaped like the README's examples.
EXAMPLES: dict[str, dict[str, Any]] = {
    "lead.created": {
        "type": "lead.created",
        "timestamp": "2026-11-26T18:35:40.512Z",
        "data": {
            "lead": {
                "@id": "/api/v4/leads/100026",
                "@type": "Lead",
                "id": 100026,
                "createdTs": "2026-11-26T18:35:39+00:00",
                "updatedTs": "2026-11-26T18:35:39+00:00",
                "email": "ava.patel@blueharbour.example",
                "qaResult": {"@id": "/api/v4/lead-qa-results/1", "@type": "LeadQaResult", "name": "Valid"},
                "leadData": [
                    {"@id": "/api/v4/lead-datas/1000260", "@type": "LeadData", "name": "country", "value": "UK"}
                ],
                "campaign": "/api/v4/campaigns/601",
            }
        },
    },
    "lead.updated": {
        "type": "lead.updated",
        "timestamp": "2026-11-26T19:02:11.004Z",
        "data": {
            "lead": {"id": 100026, "score": 100},
            "changes": {
                "qaResult": {
                    "from": {"@id": "/api/v4/lead-qa-results/3", "@type": "LeadQaResult", "name": "Caution"},
                    "to": {"@id": "/api/v4/lead-qa-results/1", "@type": "LeadQaResult", "name": "Valid"},
                },
                "advertiserBillable": {"from": False, "to": True},
                "leadData.jobTitle": {"from": "Engineer", "to": "CTO"},
                "leadData.Job Title (free text)": {"from": None, "to": "CTO"},
            },
        },
    },
    "campaign.created": {
        "type": "campaign.created",
        "timestamp": "2026-11-26T18:40:00.000Z",
        "data": {
            "campaign": {
                "@id": "/api/v4/campaigns/604",
                "@type": "Campaign",
                "id": 604,
                "name": "Juniper Health - Payroll Q4",
                "status": "Inactive",
                "startTs": "2026-12-01T00:00:00+00:00",
            }
        },
    },
    "campaign.status_changed": {
        "type": "campaign.status_changed",
        "timestamp": "2026-11-26T18:45:00.000Z",
        "data": {"campaign": {"id": 601, "name": "Blue Harbour", "status": "Paused"}, "from": "Active", "to": "Paused"},
    },
    "watcher.test": {"type": "watcher.test", "timestamp": "2026-11-26T18:50:00.000Z", "data": {"sink": "crm"}},
}


def test_every_event_type_ships_a_valid_schema() -> None:
    """Each event type has `<type>.json` in the package, a valid draft 2020-12 schema, and nothing else ships."""
    shipped = {p.name for p in files("watcher.schemas").iterdir() if p.name.endswith(".json")}
    assert shipped == {f"{t}.json" for t in EVENT_TYPES}
    ids = set()
    for event_type in EVENT_TYPES:
        schema = schemas.load(event_type)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)
        assert schema["properties"]["type"] == {"const": event_type}
        ids.add(schema["$id"])
    assert len(ids) == len(EVENT_TYPES)
    with pytest.raises(KeyError):
        schemas.load("lead.deleted")


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_readme_shaped_examples_validate(event_type: str) -> None:
    """A body shaped like the README's example of each type is valid."""
    validate_event(EXAMPLES[event_type])


def _sim() -> Simulator:
    sim = Simulator(seed=4, clock=FakeClock(NOW))
    sim.seed_data(campaigns=3, leads=0)
    return sim


def _built_events() -> list[Event]:
    """Events made by the watcher's own builders from simulator documents, one or more per type."""
    sim = _sim()
    campaign = sim.campaign_ids()[0]
    lead = sim.add_lead(campaign, lead_data={"telephone": "0700", "jobTitle": "Engineer"}, qaResult="Caution")
    before = detect.snapshot(lead, DEFAULT_TRACK)
    after_doc = sim.update_lead(lead["id"], qaResult="Valid", lead_data={"jobTitle": "CTO"}, email="new@x.example")
    changes = detect.diff(before, detect.snapshot(after_doc, DEFAULT_TRACK))
    doc = {"@context": "/api/v4/contexts/Campaign", **sim.campaign(campaign)}
    paused = sim.pause_campaign(campaign)
    sink = SinkConfig(name="crm-main_2", type="webhook", url="http://127.0.0.1:9/")
    return [
        detect.lead_created({"@context": "/api/v4/contexts/Lead", **lead}, DETECTED),
        detect.lead_updated(after_doc, changes, DETECTED),
        detect.lead_updated(after_doc, {"email": changes["email"]}, DETECTED),  # only personal: empty without PII
        detect.campaign_created(doc, DETECTED),
        detect.campaign_status_changed(paused, "Active", "Paused", 1, DETECTED),
        build_test_event(sink, NOW),
    ]


@pytest.mark.parametrize("include_pii", [True, False], ids=["with-pii", "without-pii"])
def test_events_the_watcher_builds_validate(include_pii: bool) -> None:
    """Every body the builders make from simulator documents is valid, as sent to a sink with or without PII."""
    sink = SinkConfig(name="crm", type="webhook", url="http://127.0.0.1:9/", include_pii=include_pii)
    built = _built_events()
    assert {e.type for e in built} == set(EVENT_TYPES)
    for event in built:
        body = json.loads(event.body(render_data(event, sink)))
        validate_event(body)


# leadData names Convertr stores as typed by whoever built the form: nothing forbids any of these.
ODD_LEAD_DATA_NAMES = (
    "",
    "Job\nTitle",
    "trailing newline\n",
    "\r\n",
    "Job Title (free text)",
    "Téléphone / 電話番号 ☎",
    "line\u2028separator",
    ".",
    "leadData.nested",
    "tab\tand\x00nul",
    "x" * 10_000,
)


@pytest.mark.parametrize("include_pii", [True, False], ids=["with-pii", "without-pii"])
def test_odd_lead_data_names_through_detection_validate(include_pii: bool) -> None:
    """A lead.updated body whose changes come from leadData entries with odd names (empty, line breaks, unicode,
    spaces, very long) as detection builds them from API documents is valid against the shipped schema."""
    sim = _sim()
    campaign = sim.campaign_ids()[0]
    lead = sim.add_lead(campaign, lead_data=dict.fromkeys(ODD_LEAD_DATA_NAMES, "before"))
    # Parsed from the serialised document, as the poller reads it from the API.
    before_doc = json.loads(sim.lead_document(lead["id"]) or "null")
    sim.update_lead(lead["id"], lead_data=dict.fromkeys(ODD_LEAD_DATA_NAMES, "after"))
    after_doc = json.loads(sim.lead_document(lead["id"]) or "null")
    changes = detect.diff(detect.snapshot(before_doc, DEFAULT_TRACK), detect.snapshot(after_doc, DEFAULT_TRACK))
    assert set(changes) == {"leadData." + name for name in ODD_LEAD_DATA_NAMES}
    event = detect.lead_updated(after_doc, changes, DETECTED, previous=before_doc["updatedTs"])
    sink = SinkConfig(name="crm", type="webhook", url="http://127.0.0.1:9/", include_pii=include_pii)
    body = json.loads(event.body(render_data(event, sink)))
    validate_event(body)


def test_change_keys_the_daemon_never_makes_are_still_rejected() -> None:
    """Loosening the leadData branch leaves keys no tracked field can produce refused."""
    for key in ("", "score.", " leadData.x", "1score", "bad field", "score\nx", "@id"):
        body = copy.deepcopy(EXAMPLES["lead.updated"])
        body["data"]["changes"] = {key: {"from": 1, "to": 2}}
        assert any("does not match" in e for e in schema_errors(body)), key


def _mutate(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split("/")

    def apply(body: dict[str, Any]) -> None:
        node = body
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return apply


_DELETE = object()


@pytest.mark.parametrize(
    ("event_type", "path", "value", "complaint"),
    [
        ("lead.created", "data/lead/@context", "/api/v4/contexts/Lead", "@context"),
        ("lead.created", "data/lead/id", "100026", "is not of type 'integer'"),
        ("lead.created", "data/lead", _DELETE, "'lead' is a required property"),
        ("lead.created", "timestamp", _DELETE, "'timestamp' is a required property"),
        ("lead.created", "timestamp", "2026-11-26T18:35:40+00:00", "does not match"),
        ("lead.created", "extra", 1, "Additional properties"),
        ("lead.updated", "data/changes/score", {"from": 1}, "'to' is a required property"),
        ("lead.updated", "data/changes/score", {"from": 1, "to": 2, "by": "x"}, "Additional properties"),
        ("lead.updated", "data/changes/bad field", {"from": 1, "to": 2}, "does not match"),
        ("campaign.created", "data/campaign/apiKey", "0123", "apiKey"),
        ("campaign.created", "data/campaign/facebookSystemUserAccessToken", "EAAB", "facebookSystemUserAccessToken"),
        ("campaign.status_changed", "data/campaign/status", _DELETE, "'status' is a required property"),
        ("campaign.status_changed", "data/to", None, "is not of type 'string'"),
        ("watcher.test", "data/sink", "crm sink!", "does not match"),
        ("watcher.test", "data/extra", True, "Additional properties"),
    ],
)
def test_broken_bodies_are_rejected(event_type: str, path: str, value: Any, complaint: str) -> None:
    """Each way of breaking a body is caught, and the message names it."""
    body = copy.deepcopy(EXAMPLES[event_type])
    _mutate(path, value)(body)
    errors = schema_errors(body)
    assert any(complaint in e for e in errors), errors
    with pytest.raises(AssertionError, match="breaks its schema"):
        validate_event(body)


def test_unknown_types_are_rejected() -> None:
    """A body whose type the watcher never emits has no schema and fails validation."""
    assert schema_errors({"type": "lead.deleted", "timestamp": DETECTED, "data": {}}) == [
        "type: no schema for event type 'lead.deleted'"
    ]
    assert schema_errors({"timestamp": DETECTED, "data": {}}) == ["type: missing or not a string"]


def test_each_schema_accepts_only_its_own_type() -> None:
    """A receiver checking a body against one type's schema sees any other type refused."""
    for event_type in EVENT_TYPES:
        checker = validator(event_type)
        for other, body in EXAMPLES.items():
            assert checker.is_valid(body) == (other == event_type), (event_type, other)
