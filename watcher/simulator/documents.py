"""Campaign records, their derived status and statistics, and edits to lead documents."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from watcher.simulator.generate import QA_IDS, flag_object, money, qa_object
from watcher.simulator.phptime import iso, wall_of

CAMPAIGN_TIMESTAMPS = ("startTs", "endTs", "updatedTs", "pauseTs", "signTs", "createdTs")
CAMPAIGN_ORDER = (
    "@id", "@type", "status", "id", "name", "startTs", "endTs", "exposePublisher", "exposePublisherSub",
    "updatedTs", "defaultThresholdScore", "integrate", "callCentre", "welcomeEmail", "doubleOptin",
    "scoreBaseRouting", "defaultSaleValue", "defaultSaleCurrency", "advertiser", "accountManager",
    "subcategory", "country", "campaignMarket", "contractValue", "performanceModel", "internalOnly",
    "defaultPublisherRate", "publisherPayoutType", "manualScore", "combinedJobScore", "useValueTransforms",
    "campaignManager", "pauseTs", "publisherTerms", "sendVoucher", "testMode", "sendMediakit",
    "conversionRate", "currency", "baseCurrencyContractValue", "endTsExtension", "unavailableCampaignLogic",
    "unavailableCampaignRedirectUrl", "holdPublisherOverDelivery", "valueBasedRouting", "autoSignPublisher",
    "variablePublisherPayout", "useScheduledDelivery", "uncapped", "facebookOfflineEventSetId",
    "facebookSystemUserAccessToken", "leadProcessDelay", "apiKey", "leadsRequired", "payoutAmount", "payout",
    "baseCurrencyPayoutAmount", "notes", "signName", "signRole", "signTs", "signIoNumber", "terms",
    "statistics", "signHash", "allowPublisherImportExport", "purchaseOrder", "referenceNumber",
    "purchaseOrderFile",
)  # fmt: skip
DERIVED = ("@id", "@type", "id", "status", "statistics")


@dataclass
class CampaignRecord:
    """A campaign as stored: static fields plus its timestamps in Unix seconds."""

    id: int
    fields: dict[str, Any]
    times: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class LeadCounts:
    """Visible leads of one campaign by QA result, and the newest creation time."""

    by_qa: Mapping[str, int]
    last_created: int | None

    def get(self, qa: str) -> int:
        return self.by_qa.get(qa, 0)

    @property
    def total(self) -> int:
        return sum(self.by_qa.values())


NO_LEADS = LeadCounts({}, None)


def campaign_status(record: CampaignRecord, now: int, valid_leads: int) -> str:
    """Convertr's dashboard status, derived at read time: it moves with the clock alone."""
    t = record.times
    pause, sign, start, end = t.get("pauseTs"), t.get("signTs"), t.get("startTs"), t.get("endTs")
    if pause is not None and pause <= now:
        return "Paused"
    if sign is None:
        return "Setup Required"
    if start is not None and now < start:
        return "Inactive"
    required = record.fields.get("leadsRequired")
    allocation_met = not record.fields.get("uncapped") and isinstance(required, int) and 0 < required <= valid_leads
    if (end is not None and now > end) or allocation_met:
        return "Ended"
    return "Active"


def statistics(record: CampaignRecord, counts: LeadCounts, zone: ZoneInfo) -> dict[str, Any]:
    valid = counts.get("Valid")
    total = counts.total
    payout = float(record.fields.get("payoutAmount") or 0) * valid
    rate = float(record.fields.get("defaultPublisherRate") or 0) / 100
    return {
        "totalLeads": total,
        "invalidLeads": counts.get("Invalid"),
        "cautionLeads": counts.get("Caution"),
        "validLeads": valid,
        "billableLeads": valid,
        "deliveredLeads": valid + counts.get("Test"),
        "heldLeads": 0,
        "processingLeads": 0,
        "impressions": total * 37,
        "conversions": total,
        "lastConversion": None if counts.last_created is None else iso(counts.last_created, zone),
        "clicks": total * 3,
        "activePublishers": min(total, 1 + record.id % 4),
        "totalSales": 0,
        "campaignRevenue": {
            "revenue": money(payout),
            "baseCurrencyRevenue": money(payout),
            "publisherPayout": money(payout * rate),
            "baseCurrencyPublisherPayout": money(payout * rate),
        },
        "unsignedContracts": 0 if record.times.get("signTs") is not None else 1,
    }


def campaign_document(record: CampaignRecord, counts: LeadCounts, now: int, zone: ZoneInfo) -> dict[str, Any]:
    """The API document in Convertr's key order; fields added later go last."""
    values: dict[str, Any] = {
        "@id": f"/api/v4/campaigns/{record.id}",
        "@type": "Campaign",
        "id": record.id,
        "status": campaign_status(record, now, counts.get("Valid")),
        "statistics": statistics(record, counts, zone),
    }
    for name, ts in record.times.items():
        values[name] = None if ts is None else iso(ts, zone)
    values.pop("createdTs", None)  # filterable but not part of the published document
    values.update(record.fields)
    doc = {key: values.pop(key) for key in CAMPAIGN_ORDER if key in values}
    doc.update(values)
    return doc


def campaign_row(record: CampaignRecord, status: str, zone: ZoneInfo) -> dict[str, Any]:
    """What the campaign filters look at."""
    walls = {k: (None if v is None else wall_of(v, zone)) for k, v in record.times.items()}
    return {"id": record.id, "name": record.fields.get("name"), "status": status, "walls": walls}


def apply_lead_fields(
    doc: dict[str, Any], fields: Mapping[str, Any], lead_data: Mapping[str, str] | None, next_data_id: int
) -> int:
    """Apply edits to a lead document in place; returns how many new lead-data ids were used."""
    for name, value in fields.items():
        if name in ("@id", "@type", "id", "createdTs", "updatedTs"):
            raise ValueError(f"lead field {name} cannot be set directly")
        if name not in doc:
            raise ValueError(f"unknown lead field: {name}")
        if name == "qaResult" and isinstance(value, str):
            if value not in QA_IDS:
                raise ValueError(f"unknown QA result: {value}")
            doc[name] = qa_object(value)
            if "advertiserBillable" not in fields:
                doc["advertiserBillable"] = doc["publisherBillable"] = value == "Valid"
        elif name == "leadFlag" and (value is None or isinstance(value, str)):
            if value is not None and value not in QA_IDS:
                raise ValueError(f"unknown lead flag: {value}")
            doc[name] = flag_object(value)
        elif name == "campaign" and isinstance(value, int):
            doc[name] = f"/api/v4/campaigns/{value}"
        else:
            doc[name] = value
    used = 0
    for name, value in (lead_data or {}).items():
        entries = doc["leadData"]
        for entry in entries:
            if entry.get("name") == name:
                entry["value"] = value
                break
        else:
            entries.append(
                {"@id": f"/api/v4/lead-datas/{next_data_id + used}", "@type": "LeadData", "name": name, "value": value}
            )
            used += 1
    return used


def qa_of(doc: Mapping[str, Any]) -> str:
    qa = doc.get("qaResult")
    name = qa.get("name") if isinstance(qa, dict) else None
    return name if isinstance(name, str) else "Valid"
