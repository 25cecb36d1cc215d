"""Leaving personal data out of a sink's payloads (`include_pii = false`).

What counts as personal (removed):
- lead fields that identify or locate a person: `title`, `firstName`, `lastName`, `email`,
  `emailHash` (a pseudonym of the email), `telephone`, `addressLine1`..`addressLine4`, `postcode`,
  `ip`, `host`, `fingerprint` (device), `dob`/`dateOfBirth`, `sex`, `photo`;
- `leadData` entries whose name is one of those, or a common spelling of a name, phone number,
  email address, street address, postcode, IP address, birth date or social-profile URL
  (matched case-insensitively, ignoring `_`, `-`, `.` and spaces);
- the same names in `changes` (`"email"`, `"leadData.email"`);
- the `email` of an embedded campaign's `advertiser` (a contact person's mailbox);
- by value, wherever it sits: any field, `leadData` entry or change whose value (or a string
  anywhere inside it) holds an e-mail address or a phone number. Names are free-form per
  campaign ("Manager", "Reach me on"), so the name alone cannot be trusted to say what a value is.

What is kept on purpose, as business data: `jobTitle`, `companyName`, `industry`, company size,
`country`/`city` and other coarse location, `emailDomain` (names the employer, not the person),
`leadHash`, scores, statuses, payouts and every id.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from watcher.events import lead_data_name

# An address with a local part: "@example.com" alone (the `emailDomain` business field) is not one.
EMAIL = re.compile(r"[\w.%+'-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")
# A run of digits with the separators phone numbers are written with; judged by its digit count.
_PHONE = re.compile(r"(?<![\w/])\+?\(?\d[\d ().\-/\u00a0]{6,}\d(?!\d)")
# 9 to 15 digits: E.164 allows 15, and national numbers without a trunk prefix have at least 9.
_PHONE_DIGITS = range(9, 16)
# Dates ("2026-11-26 18:35", "26/11/2026 18:35") have phone-like digit runs; not personal on their own.
_DATE = re.compile(r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}/\d{1,2}/\d{4}")
# A bare run of digits with no phone formatting (no leading + or 0, no separators) is an amount, a
# reference or a timestamp far more often than a phone number: only a field's name can say.
_BARE_NUMBER = re.compile(r"[1-9]\d*")
# Convertr's own IRIs carry long ids ("/api/v4/lead-datas/900000000"): never a person's data.
_IRI = re.compile(r"^/api/v\d+/")
HIDDEN = "[personal data hidden]"
_CONVERTR_KEYS = frozenset({"@id", "@type", "@context"})  # written by Convertr, never by a person

# Top-level lead document fields, exactly as the API spells them. The contact details (who the
# person is and how to reach them) are also what `[leads] track` watches by default (config.py).
CONTACT_FIELDS: tuple[str, ...] = (
    "firstName",
    "lastName",
    "email",
    "telephone",
    "addressLine1",
    "addressLine2",
    "addressLine3",
    "addressLine4",
    "postcode",
)
LEAD_FIELDS: frozenset[str] = frozenset(
    {
        *CONTACT_FIELDS,
        "title",
        "emailHash",
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


# Every personal name in its normalised spelling: a lead field written another way ("first_name")
# means the same as the API's own ("firstName").
_PERSONAL_NAMES: frozenset[str] = _LEAD_DATA_NAMES | {_normalise(f) for f in LEAD_FIELDS}


def is_personal_lead_data(name: str) -> bool:
    """Whether a `leadData` entry with this name holds personal data."""
    return _normalise(name) in _LEAD_DATA_NAMES


def is_personal_name(name: str) -> bool:
    """Whether `name`, in any spelling (case, `_`, `-`, `.` and spaces ignored), is one of the
    personal names above: a lead field or a `leadData` name. For keys not written by Convertr,
    such as a log line's."""
    return _normalise(name) in _PERSONAL_NAMES


def is_personal_field(field: str) -> bool:
    """Whether a `changes` key (`"email"`, `"leadData.telephone"`, `"leadData#9001.telephone"`) names
    personal data."""
    name = lead_data_name(field)
    if name is not None:
        return is_personal_lead_data(name)
    return field in LEAD_FIELDS


def _phones(text: str) -> list[re.Match[str]]:
    if _IRI.match(text):
        return []
    return [
        m
        for m in _PHONE.finditer(text)
        if sum(ch.isdigit() for ch in m.group()) in _PHONE_DIGITS
        and not _DATE.search(text[max(0, m.start() - 6) : m.end() + 6])
        and not _BARE_NUMBER.fullmatch(m.group())
        and not _is_range(m.group())
    ]


def _is_range(text: str) -> bool:
    """ "100000 - 500000": two amounts, not one number."""
    parts = [p.strip() for p in text.split(" - ")]
    return len(parts) == 2 and all(_BARE_NUMBER.fullmatch(p) for p in parts)


def is_personal_text(text: str) -> bool:
    """Whether a string holds an e-mail address or a phone number anywhere in it."""
    return bool(EMAIL.search(text)) or bool(_phones(text))


def has_personal_value(value: Any) -> bool:
    """Whether a value, or any string or key anywhere inside it, holds an e-mail address or phone number."""
    if isinstance(value, str):
        return is_personal_text(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return is_personal_text(str(value))
    if isinstance(value, Mapping):
        return any(
            has_personal_value(str(k)) or has_personal_value(v) for k, v in value.items() if k not in _CONVERTR_KEYS
        )
    if isinstance(value, list | tuple):
        return any(has_personal_value(v) for v in value)
    return False


def mask_text(text: str) -> str:
    """`text` with every e-mail address and phone number in it replaced by HIDDEN."""
    masked = EMAIL.sub(HIDDEN, text)
    for m in reversed(_phones(masked)):
        masked = masked[: m.start()] + HIDDEN + masked[m.end() :]
    return masked


def mask_values(value: Any) -> Any:
    """A copy of `value` with every e-mail address and phone number in its strings and keys masked."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and is_personal_text(str(value)):
        return HIDDEN
    if isinstance(value, Mapping):
        return {
            mask_text(str(k)) if isinstance(k, str) else k: v if k in _CONVERTR_KEYS else mask_values(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [mask_values(v) for v in value]
    return value


def is_personal_change(field: str, change: Any) -> bool:
    """Whether a `changes` entry is personal: by its name, or by what its name or from/to hold."""
    return is_personal_field(field) or is_personal_text(field) or has_personal_value(change)


# Fields a lead or campaign document needs to stay the document the schemas describe; their values
# are ids and IRIs written by Convertr, never by a person filling in a form.
_KEEP = frozenset({"@id", "@type", "@context", "id", "campaign", "createdTs", "updatedTs"})


def _drop_personal_values(doc: dict[str, Any]) -> None:
    for key in [k for k, v in doc.items() if k not in _KEEP and (is_personal_text(str(k)) or has_personal_value(v))]:
        if key == "leadData" and isinstance(doc[key], list):
            continue  # filtered entry by entry below, so one entry does not take the rest with it
        doc.pop(key)


def _strip_lead(lead: dict[str, Any]) -> None:
    for key in LEAD_FIELDS:
        lead.pop(key, None)
    items = lead.get("leadData")
    if isinstance(items, list):
        lead["leadData"] = [
            item
            for item in items
            if not (isinstance(item, Mapping) and is_personal_lead_data(str(item.get("name", ""))))
            and not has_personal_value(item)
        ]
    _drop_personal_values(lead)


def strip_pii(data: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of an event's `data` without the personal fields listed in this module's docstring."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    lead = out.get("lead")
    if isinstance(lead, dict):
        _strip_lead(lead)
    changes = out.get("changes")
    if isinstance(changes, dict):
        out["changes"] = {k: v for k, v in changes.items() if not is_personal_change(str(k), v)}
    campaign = out.get("campaign")
    if isinstance(campaign, dict):
        advertiser = campaign.get("advertiser")
        if isinstance(advertiser, dict):
            advertiser.pop("email", None)
            _drop_personal_values(advertiser)
        _drop_personal_values(campaign)
    # Anything else in `data` (a status change's from/to, a test event's sink name) is masked in place.
    for key in [k for k in out if k not in ("lead", "changes", "campaign")]:
        out[key] = mask_values(out[key])
    return out
