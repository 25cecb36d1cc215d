"""Leaving personal data out of a sink's payloads (`include_pii = false`).

What counts as personal (removed):
- lead fields that identify or locate a person: `title`, `firstName`, `lastName`, `email`,
  `emailHash` (a pseudonym of the email), `telephone`, `addressLine1`..`addressLine4`, `postcode`,
  `ip`, `host`, `fingerprint` (device), `dob`/`dateOfBirth`, `sex`, `photo`;
- `leadData` entries whose name is one of those, or a common spelling of a name, phone number,
  email address, street address, postcode, IP address, birth date or social-profile URL
  (matched case-insensitively, ignoring `_`, `-`, `.` and spaces);
- the same names in `changes` (`"email"`, `"leadData.email"`);
- the `email` of an embedded campaign's `advertiser` (a contact person's mailbox).

What is kept on purpose, as business data: `jobTitle`, `companyName`, `industry`, company size,
`country`/`city` and other coarse location, `emailDomain` (names the employer, not the person),
`leadHash`, scores, statuses, payouts and every id.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# Top-level lead document fields, exactly as the API spells them.
LEAD_FIELDS: frozenset[str] = frozenset(
    {
        "title",
        "firstName",
        "lastName",
        "email",
        "emailHash",
        "telephone",
        "addressLine1",
        "addressLine2",
        "addressLine3",
        "addressLine4",
        "postcode",
        "ip",
        "host",
        "fingerprint",
        "dob",
        "dateOfBirth",
        "sex",
        "photo",
    }
)

# `leadData` names are free-form per campaign, so they are compared in a normalised spelling.
_LEAD_DATA_NAMES: frozenset[str] = frozenset(
    {
        "title",
        "firstname",
        "forename",
        "givenname",
        "lastname",
        "surname",
        "familyname",
        "name",
        "fullname",
        "contactname",
        "email",
        "emailaddress",
        "workemail",
        "businessemail",
        "personalemail",
        "emailhash",
        "telephone",
        "phone",
        "phonenumber",
        "tel",
        "mobile",
        "mobilenumber",
        "mobilephone",
        "cellphone",
        "workphone",
        "directdial",
        "address",
        "address1",
        "address2",
        "address3",
        "address4",
        "addressline1",
        "addressline2",
        "addressline3",
        "addressline4",
        "street",
        "streetaddress",
        "postcode",
        "postalcode",
        "zip",
        "zipcode",
        "ip",
        "ipaddress",
        "host",
        "fingerprint",
        "dob",
        "dateofbirth",
        "birthdate",
        "birthday",
        "sex",
        "gender",
        "photo",
        "linkedin",
        "linkedinurl",
        "linkedinprofile",
    }
)


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "_-. ")


def is_personal_lead_data(name: str) -> bool:
    """Whether a `leadData` entry with this name holds personal data."""
    return _normalise(name) in _LEAD_DATA_NAMES


def is_personal_field(field: str) -> bool:
    """Whether a `changes` key (`"email"`, `"leadData.telephone"`) names personal data."""
    if field.startswith("leadData."):
        return is_personal_lead_data(field[len("leadData.") :])
    return field in LEAD_FIELDS


def _strip_lead(lead: dict[str, Any]) -> None:
    for key in LEAD_FIELDS:
        lead.pop(key, None)
    items = lead.get("leadData")
    if isinstance(items, list):
        lead["leadData"] = [
            item
            for item in items
            if not (isinstance(item, Mapping) and is_personal_lead_data(str(item.get("name", ""))))
        ]


def strip_pii(data: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of an event's `data` without the personal fields listed in this module's docstring."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    lead = out.get("lead")
    if isinstance(lead, dict):
        _strip_lead(lead)
    changes = out.get("changes")
    if isinstance(changes, dict):
        out["changes"] = {k: v for k, v in changes.items() if not is_personal_field(str(k))}
    campaign = out.get("campaign")
    if isinstance(campaign, dict):
        advertiser = campaign.get("advertiser")
        if isinstance(advertiser, dict):
            advertiser.pop("email", None)
    return out
