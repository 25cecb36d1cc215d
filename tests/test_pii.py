"""Personal fields leave event data when a sink has include_pii = false; business data stays."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from watcher.pii import LEAD_FIELDS, is_personal_field, is_personal_lead_data, strip_pii


def lead_data(name: str, value: str) -> dict[str, Any]:
    return {"@id": f"/api/v4/lead-datas/{abs(hash(name)) % 1000}", "@type": "LeadData", "name": name, "value": value}


LEAD: dict[str, Any] = {
    "@id": "/api/v4/leads/42",
    "@type": "Lead",
    "id": 42,
    "title": "Dr",
    "firstName": "Ada",
    "lastName": "Lovelace",
    "email": "ada@example.org",
    "emailHash": "5f1c",
    "telephone": "+44 20 7946 0000",
    "addressLine1": "1 Analytical Way",
    "addressLine2": "Marylebone",
    "addressLine3": "",
    "addressLine4": "",
    "postcode": "NW1 6XE",
    "ip": "203.0.113.9",
    "host": None,
    "fingerprint": "0123456789abcdef0123456789abcdef",
    "dob": "1815-12-10",
    "sex": "F",
    "photo": "",
    "campaign": "/api/v4/campaigns/601",
    "score": 80,
    "maxScore": 100,
    "processrStatus": 1000,
    "publisherPayout": "22.73",
    "createdTs": "2024-04-01T10:00:00+01:00",
    "leadData": [
        lead_data("jobTitle", "Engineer"),
        lead_data("companyName", "Babbage & Co"),
        lead_data("emailDomain", "example.org"),
        lead_data("country", "GB"),
        lead_data("leadHash", "0" * 32),
        lead_data("mobile_number", "+44 7700 900000"),
        lead_data("Full Name", "Ada Lovelace"),
        lead_data("LinkedIn-URL", "https://linkedin.example/ada"),
        lead_data("zip", "NW1"),
        lead_data("dateOfBirth", "1815-12-10"),
    ],
}
PERSONAL_VALUES = [
    "Ada",
    "Lovelace",
    "ada@example.org",
    "+44 20 7946 0000",
    "1 Analytical Way",
    "NW1 6XE",
    "203.0.113.9",
    "1815-12-10",
    "+44 7700 900000",
    "linkedin.example",
]


def test_personal_lead_fields_and_lead_data_are_removed_business_data_kept() -> None:
    """Every personal top-level field and leadData entry goes; ids, scores and business leadData stay."""
    out = strip_pii({"lead": LEAD})
    lead = out["lead"]
    assert not LEAD_FIELDS & lead.keys()
    for key in ("id", "@id", "campaign", "score", "maxScore", "processrStatus", "publisherPayout", "createdTs"):
        assert lead[key] == LEAD[key]
    assert [d["name"] for d in lead["leadData"]] == ["jobTitle", "companyName", "emailDomain", "country", "leadHash"]
    text = repr(out)
    for value in PERSONAL_VALUES:
        assert value not in text


def test_input_is_not_modified() -> None:
    """strip_pii returns a deep copy; the event's own data is untouched."""
    data = {"lead": copy.deepcopy(LEAD), "changes": {"email": {"from": "a@x", "to": "b@x"}}}
    before = copy.deepcopy(data)
    out = strip_pii(data)
    assert data == before
    out["lead"]["leadData"].append("x")
    assert data == before


@pytest.mark.parametrize(
    ("field", "personal"),
    [
        ("email", True),
        ("firstName", True),
        ("telephone", True),
        ("addressLine3", True),
        ("postcode", True),
        ("ip", True),
        ("dob", True),
        ("dateOfBirth", True),
        ("leadData.email", True),
        ("leadData.Email_Address", True),
        ("leadData.phone-number", True),
        ("leadData.last name", True),
        ("leadData.postal.code", True),
        ("leadData.birthdate", True),
        ("score", False),
        ("processrStatus", False),
        ("campaign", False),
        ("leadData.jobTitle", False),
        ("leadData.companyName", False),
        ("leadData.emailDomain", False),
        ("leadData.country", False),
        ("leadData.leadHash", False),
        ("Email", False),  # top-level names are the API's exact spelling
    ],
)
def test_is_personal_field(field: str, personal: bool) -> None:
    """Change keys are classified by the documented lists; leadData names are matched loosely."""
    assert is_personal_field(field) is personal


@pytest.mark.parametrize(
    "name", ["EMAIL", "e-mail", "Work Email", "Mobile", "street_address", "ZipCode", "IP_Address", "d.o.b"]
)
def test_lead_data_names_match_in_any_spelling(name: str) -> None:
    """Case, spaces, dashes, dots and underscores do not hide a personal leadData entry."""
    assert is_personal_lead_data(name)


def test_changes_lose_personal_fields() -> None:
    """`changes` keeps business fields and drops personal ones, top-level or leadData."""
    data = {
        "lead": {"id": 1, "email": "x@y"},
        "changes": {
            "email": {"from": "a@x", "to": "b@x"},
            "leadData.telephone": {"from": None, "to": "123"},
            "leadData.jobTitle": {"from": "Dev", "to": "CTO"},
            "score": {"from": 10, "to": 90},
        },
    }
    out = strip_pii(data)
    assert out["changes"] == {
        "leadData.jobTitle": {"from": "Dev", "to": "CTO"},
        "score": {"from": 10, "to": 90},
    }
    assert out["lead"] == {"id": 1}


@pytest.mark.parametrize(
    "data",
    [
        {"sink": "crm"},
        {"campaign": {"id": 601, "name": "Spring", "status": "Active"}, "from": "Paused", "to": "Active"},
        {"lead": "not-a-document"},
        {"lead": {"id": 3, "leadData": "odd"}},
        {"lead": {"id": 3, "leadData": [1, None, {"value": "no name"}]}},
        {},
    ],
)
def test_data_without_personal_fields_passes_through(data: dict[str, Any]) -> None:
    """Test events, campaign events and odd shapes come out equal to what went in."""
    assert strip_pii(data) == data


def test_campaign_advertiser_contact_email_is_removed() -> None:
    """An embedded advertiser's email is a person's mailbox; the rest of the campaign stays."""
    data = {"campaign": {"id": 601, "advertiser": {"id": 9, "name": "Acme", "email": "jo@acme.test"}}}
    assert strip_pii(data) == {"campaign": {"id": 601, "advertiser": {"id": 9, "name": "Acme"}}}


@pytest.mark.parametrize(
    "value",
    [
        "250000000",  # an amount
        "123456789",  # an order reference
        "1732645000",  # a Unix time
        "26/11/2026 18:35",
        "11/26/2026 06:35 PM",
        "123e4567-e89b-12d3-a456-426614174000",
        "100000 - 500000",
        "/api/v4/lead-datas/900000000",  # Convertr's own IRI
    ],
)
def test_business_values_are_not_taken_for_phone_numbers(value: str) -> None:
    """Amounts, references, dates, uuids, ranges and Convertr IRIs are kept: only formatted numbers are phones."""
    from watcher.pii import has_personal_value

    assert not has_personal_value(value)


@pytest.mark.parametrize(
    "value", ["07700900123ext", "Call 07700900123x2", "jöhn@exämple.de", "+44 20 7946 0958", "(020) 7946 0958"]
)
def test_phone_numbers_and_addresses_are_found_where_people_write_them(value: str) -> None:
    """A phone number followed by letters and an address with accents are personal values."""
    from watcher.pii import has_personal_value

    assert has_personal_value(value)


def test_a_lead_data_entry_is_judged_by_its_value_not_its_iri() -> None:
    """A business leadData entry whose Convertr id is long stays in a webhook without personal data."""
    entry = {"@id": "/api/v4/lead-datas/900000000", "@type": "LeadData", "name": "Industry", "value": "Retail"}
    assert strip_pii({"lead": {"id": 1, "leadData": [entry]}})["lead"]["leadData"] == [entry]
