"""Seeded fake Convertr data: every value is a pure function of (seed, id), so a lead's
document can be rebuilt on demand instead of stored, and two runs with one seed agree.

Names and domains are invented (`.example` domains), never real people or addresses.
"""

from __future__ import annotations

import hashlib
from typing import Any

FIRST_NAMES = (
    "Amelia", "Oliver", "Isla", "George", "Ava", "Noah", "Mia", "Arthur", "Ivy", "Leo",
    "Freya", "Oscar", "Lily", "Harry", "Grace", "Jack", "Sofia", "Theo", "Ella", "Finn",
    "Aisha", "Mohammed", "Priya", "Tomasz", "Chloe", "Daniel", "Niamh", "Rhys", "Zara", "Kwame",
)  # fmt: skip
LAST_NAMES = (
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Evans", "Thomas", "Roberts",
    "Walker", "Wright", "Robinson", "Thompson", "White", "Hughes", "Edwards", "Green", "Hall",
    "Wood", "Harris", "Patel", "Khan", "Nowak", "Murphy", "Campbell", "Kelly", "Davies", "Okafor",
)  # fmt: skip
COMPANIES = (
    "Northwind Traders", "Blue Harbour Analytics", "Kestrel Logistics", "Juniper Health",
    "Oakfield Software", "Brightwater Energy", "Granite Peak Finance", "Meadowlark Media",
    "Copperline Systems", "Silverbirch Retail", "Redfern Consulting", "Ashgrove Manufacturing",
)  # fmt: skip
JOB_TITLES = (
    "Marketing Manager", "IT Director", "Head of Procurement", "CFO", "Operations Manager",
    "Software Engineer", "Sales Director", "HR Business Partner", "Data Analyst", "CTO",
)  # fmt: skip
COUNTRIES = ("United Kingdom", "United Kingdom", "United Kingdom", "Ireland", "Germany", "France", "Netherlands")
CHANNELS = ((1, "Network"), (2, "Direct"), (3, "Social"))
TITLES = ("Mr", "Ms", "Mrs", "Dr", "")
STREETS = ("High Street", "Station Road", "Church Lane", "Mill Road", "Park Avenue", "Victoria Street")
POST_AREAS = ("SW1A", "M1", "B2", "LS1", "EH1", "BS1", "CF10", "NE1")

QA_IDS = {"Valid": 1, "Invalid": 2, "Caution": 3, "Test": 4}
PAYOUTS = ("10.00", "12.50", "22.73", "35.00", "8.75")

_MASK = (1 << 64) - 1


def mix(seed: int, n: int, salt: int = 0) -> int:
    """A well-spread 64-bit number from (seed, n, salt) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + n * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def pick(options: tuple[Any, ...], seed: int, n: int, salt: int) -> Any:
    return options[mix(seed, n, salt) % len(options)]


def company_domain(company: str) -> str:
    return company.lower().replace(" ", "") + ".example"


def person(seed: int, lead_id: int) -> tuple[str, str, str]:
    """First name, last name and e-mail of a generated lead; cheap enough for bulk inserts."""
    first = pick(FIRST_NAMES, seed, lead_id, 1)
    last = pick(LAST_NAMES, seed, lead_id, 2)
    domain = company_domain(pick(COMPANIES, seed, lead_id, 3))
    return first, last, f"{first}.{last}{lead_id % 1000}@{domain}".lower()


def qa_name(seed: int, lead_id: int) -> str:
    roll = mix(seed, lead_id, 4) % 100
    return "Valid" if roll < 78 else "Caution" if roll < 88 else "Invalid" if roll < 97 else "Test"


def campaign_payout(seed: int, campaign_id: int) -> str:
    return str(pick(PAYOUTS, seed, campaign_id, 5))


def iri_object(kind: str, type_: str, number: int, name: str) -> dict[str, Any]:
    return {"@id": f"/api/v4/{kind}/{number}", "@type": type_, "name": name}


def qa_object(name: str) -> dict[str, Any]:
    return iri_object("lead-qa-results", "LeadQaResult", QA_IDS[name], name)


def flag_object(name: str | None) -> dict[str, Any] | None:
    return None if name is None else iri_object("lead-flags", "LeadFlag", QA_IDS[name], name)


def lead_data_id(lead_id: int, index: int) -> int:
    return 1_000_000 + lead_id * 32 + index


def lead_data_entry(lead_id: int, index: int, name: str, value: str) -> dict[str, Any]:
    return {
        "@id": f"/api/v4/lead-datas/{lead_data_id(lead_id, index)}",
        "@type": "LeadData",
        "name": name,
        "value": value,
    }


def money(value: float) -> str:
    return f"{value:.2f}"


def lead_document(
    seed: int,
    lead_id: int,
    campaign_id: int,
    email: str,
    qa: str,
    created_iso: str,
    updated_iso: str,
) -> dict[str, Any]:
    """The full lead document, fields in the order Convertr's examples show them."""
    first, last, _ = person(seed, lead_id)
    company = pick(COMPANIES, seed, lead_id, 3)
    r = mix(seed, lead_id, 6)
    channel_id, channel_name = pick(CHANNELS, seed, lead_id, 7)
    valid = qa == "Valid"
    delivered = qa in ("Valid", "Test")
    payout = float(campaign_payout(seed, campaign_id)) if valid else 0.0
    score = {"Valid": 100, "Test": 100, "Caution": 85 + r % 15, "Invalid": 40 + r % 40}[qa]
    lead_hash = hashlib.md5(f"{seed}:{lead_id}".encode(), usedforsecurity=False).hexdigest()
    first_job = 500_000 + lead_id * 4
    return {
        "@id": f"/api/v4/leads/{lead_id}",
        "@type": "Lead",
        "id": lead_id,
        "publisherSubId": None if r % 3 else f"sub-{r % 97}",
        "channel": {"@id": f"/api/v4/channels/{channel_id}", "@type": "Channel", "name": channel_name},
        "formHash": str(100 + r % 60),
        "createdTs": created_iso,
        "postcode": f"{pick(POST_AREAS, seed, lead_id, 8)} {r % 9}{'ABDEFGHJ'[r % 8]}{'LNPQRSTU'[r % 7]}",
        "addressLine1": f"{1 + r % 120} {pick(STREETS, seed, lead_id, 9)}",
        "addressLine2": "",
        "addressLine3": "",
        "addressLine4": "",
        "title": pick(TITLES, seed, lead_id, 10),
        "firstName": first,
        "lastName": last,
        "email": email,
        "telephone": f"077{r % 100_000_000:08d}",
        "dob": None,
        "sex": "",
        "photo": "",
        "ip": f"81.{r % 256}.{(r >> 8) % 256}.{(r >> 16) % 254 + 1}",
        "host": None,
        "optIn": r % 4 != 0,
        "doubleOptIn": None,
        "integration": delivered,
        "overAllocation": False,
        "visible": True,
        "processrStatus": 1000,
        "score": score,
        "hardfail": qa == "Invalid" and r % 5 == 0,
        "maxScore": 100,
        "processingCounter": 1,
        "suppressionList": False,
        "imported": False,
        "firstDeliveredTs": updated_iso if delivered else None,
        "emailHash": None,
        "fingerprint": hashlib.md5(f"fp:{seed}:{lead_id}".encode(), usedforsecurity=False).hexdigest()
        if r % 2
        else None,
        "updatedTs": updated_iso,
        "baseCurrencyPublisherPayout": money(payout * 0.55),
        "publisherPayout": money(payout * 0.55),
        "baseCurrencyAdvertiserPayout": money(payout),
        "advertiserPayout": money(payout),
        "advertiserBillable": valid,
        "publisherBillable": valid,
        "leadData": [
            lead_data_entry(lead_id, 0, "emailDomain", "@" + email.rpartition("@")[2]),
            lead_data_entry(lead_id, 1, "createdDate", created_iso[:10]),
            lead_data_entry(lead_id, 2, "country", pick(COUNTRIES, seed, lead_id, 11)),
            lead_data_entry(lead_id, 3, "leadHash", lead_hash),
            lead_data_entry(lead_id, 4, "jobTitle", pick(JOB_TITLES, seed, lead_id, 12)),
            lead_data_entry(lead_id, 5, "companyName", company),
        ],
        "leadNotes": [f"/api/v4/lead-notes/{300_000 + lead_id * 4 + k}" for k in range(r % 3)],
        "campaign": f"/api/v4/campaigns/{campaign_id}",
        "qaResult": qa_object(qa),
        "leadFlag": None if qa == "Caution" else flag_object(qa),
        "leadProcessrJobs": [f"/api/v4/processr-job-leads/{first_job + k}" for k in range(1 + r % 3)],
    }


def campaign_fields(seed: int, campaign_id: int, index: int) -> dict[str, Any]:
    """Static campaign fields (everything but timestamps, status and statistics)."""
    advertiser = COMPANIES[(campaign_id + seed) % len(COMPANIES)]
    topic = ("Cloud Security", "Data Platform", "Payroll", "Fleet Tracking", "Green Energy", "HR Suite")[index % 6]
    payout = campaign_payout(seed, campaign_id)
    required = (100, 250, 500, 1000, 2000)[mix(seed, campaign_id, 20) % 5]
    contract = money(required * float(payout))
    return {
        "name": f"{advertiser} - {topic} Q{1 + index % 4}",
        "exposePublisher": False,
        "exposePublisherSub": False,
        "defaultThresholdScore": 70,
        "integrate": True,
        "callCentre": False,
        "welcomeEmail": False,
        "doubleOptin": False,
        "scoreBaseRouting": False,
        "defaultSaleValue": "0.01",
        "defaultSaleCurrency": "GBP",
        "advertiser": {
            "@id": f"/api/v4/advertisers/{300 + campaign_id % 50}",
            "@type": "Advertiser",
            "id": 300 + campaign_id % 50,
            "name": advertiser,
        },
        "accountManager": None,
        "subcategory": {"@id": "/api/v4/subcategories/1", "@type": "Subcategory", "id": 1, "name": "Marketing"},
        "country": None,
        "campaignMarket": "b2b",
        "contractValue": contract,
        "performanceModel": "full",
        "internalOnly": False,
        "defaultPublisherRate": 55,
        "publisherPayoutType": "CPL",
        "manualScore": False,
        "combinedJobScore": 140,
        "useValueTransforms": True,
        "campaignManager": None,
        "publisherTerms": None,
        "sendVoucher": False,
        "testMode": False,
        "sendMediakit": True,
        "conversionRate": "1.0000",
        "currency": {
            "@id": "/api/v4/currencies/1",
            "@type": "Currency",
            "id": 1,
            "name": "GBP",
            "symbol": "£",
            "base": True,
            "rateToBase": "1.0000",
        },
        "baseCurrencyContractValue": contract,
        "endTsExtension": 0,
        "unavailableCampaignLogic": "allow_leads",
        "unavailableCampaignRedirectUrl": None,
        "holdPublisherOverDelivery": False,
        "valueBasedRouting": False,
        "autoSignPublisher": False,
        "variablePublisherPayout": False,
        "useScheduledDelivery": False,
        "uncapped": False,
        "facebookOfflineEventSetId": None,
        "facebookSystemUserAccessToken": None,
        "leadProcessDelay": 0,
        "apiKey": f"{mix(seed, campaign_id, 21):016x}{mix(seed, campaign_id, 22):016x}",
        "leadsRequired": required,
        "payoutAmount": payout,
        "payout": "CPL",
        "baseCurrencyPayoutAmount": payout,
        "notes": None,
        "signName": "Alex Morgan",
        "signRole": "Marketing Director",
        "signIoNumber": str(7000 + campaign_id % 1000),
        "terms": "",
        "signHash": f"{mix(seed, campaign_id, 23):016x}{mix(seed, campaign_id, 24):016x}",
        "allowPublisherImportExport": True,
        "purchaseOrder": None,
        "referenceNumber": None,
        "purchaseOrderFile": None,
    }
