"""JSON-LD/Hydra envelopes as API Platform 2.x writes them: collections, `hydra:view`, `hydra:search`
(the templates copied from Convertr's Quick Start page) and error bodies."""

from __future__ import annotations

import json
import math
from typing import Any

from watcher.simulator.query import Params, build_query

_DATE_OPS = ("before", "strictly_before", "after", "strictly_after")


def _dates(*props: str) -> list[tuple[str, str]]:
    return [(f"{p}[{op}]", p) for p in props for op in _DATE_OPS]


def _orders(*props: str) -> list[tuple[str, str]]:
    return [(f"order[{p}]", p) for p in props]


def _exact(*props: str) -> list[tuple[str, str]]:
    return [pair for p in props for pair in ((p, p), (f"{p}[]", p))]


LEAD_VARIABLES: list[tuple[str, str]] = [
    *_exact("id"),
    ("email", "email"),
    *_exact("campaign.id"),
    *_orders("id"),
    *_dates("createdTs", "updatedTs"),
]

_STAT_ORDERS = _orders(
    "statistics.invalidLeads",
    "statistics.validLeads",
    "statistics.cautionLeads",
    "statistics.heldLeads",
    "statistics.processingLeads",
    "statistics.billableLeads",
)
CAMPAIGN_VARIABLES: list[tuple[str, str]] = [
    *_exact("id"),
    ("name", "name"),
    *_orders("id", "name"),
    *_dates("createdTs", "updatedTs", "startTs", "endTs"),
    *_STAT_ORDERS,
    # Convertr's published mapping really names the property "query" for this one.
    ("order[statistics.impressions]", "query"),
    *_orders("statistics.conversions", "statistics.clicks"),
    ("status[]", "status"),
    *_orders(
        "advertiser.name",
        "startTs",
        "endTs",
        "country.id",
        "country.iso",
        "statistics.activePublishers",
        "statistics.totalSales",
        "statistics.campaignRevenue.revenue",
        "statistics.campaignRevenue.baseCurrencyRevenue",
    ),
    ("idName", "idName"),
    *_exact("campaignProcessrJobs.processrJob.id", "campaignPublishers.publisher.id", "advertiser.id"),
    ("advertiser.name", "advertiser.name"),
    ("campaignManager", "campaignManager"),
    ("accountManager", "accountManager"),
    *_exact("country.id", "country.iso"),
]


def search(collection_iri: str, variables: list[tuple[str, str]], drop_updated_ts: bool) -> dict[str, Any]:
    """The `hydra:search` IRI template advertising the collection's filters."""
    if drop_updated_ts:
        variables = [(v, p) for v, p in variables if p != "updatedTs"]
    return {
        "@type": "hydra:IriTemplate",
        "hydra:template": collection_iri + "{?" + ",".join(v for v, _ in variables) + "}",
        "hydra:variableRepresentation": "BasicRepresentation",
        "hydra:mapping": [
            {"@type": "IriTemplateMapping", "variable": v, "property": p, "required": False} for v, p in variables
        ],
    }


def last_page(total: int, limit: int) -> int:
    if total <= 0 or limit <= 0:
        return 1
    return math.ceil(total / limit)


def _iri(path: str, params: Params, page: int | None) -> str:
    if page is not None:
        params = {**params, "page": str(page)}
    query = build_query(params)
    return f"{path}?{query}" if query else path


def view(path: str, params: Params, page: int, last: int, legacy_next: bool) -> dict[str, Any] | None:
    """`hydra:view` for the requested path; `params` is the request query without `page`."""
    paginated = last != 1
    if not paginated and not params:
        return None
    out: dict[str, Any] = {
        "@id": _iri(path, params, page if paginated else None),
        "@type": "hydra:PartialCollectionView",
    }
    if not paginated:
        return out
    out["hydra:first"] = _iri(path, params, 1)
    out["hydra:last"] = _iri(path, params, last)
    if page != 1:
        out["hydra:previous"] = _iri(path, params, page - 1)
    # Before API Platform 2.5.5 `next` was emitted on every page but the last, even past the end.
    if page < last or (legacy_next and page != last):
        out["hydra:next"] = _iri(path, params, page + 1)
    return out


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def collection(
    context: str,
    iri: str,
    members: list[str],
    total: int,
    view_doc: dict[str, Any] | None,
    search_doc: dict[str, Any],
) -> str:
    """The JSON-LD collection, members spliced in as already-serialised documents."""
    head = dumps({"@context": context, "@id": iri, "@type": "hydra:Collection"})
    tail: dict[str, Any] = {"hydra:totalItems": total}
    if view_doc is not None:
        tail["hydra:view"] = view_doc
    tail["hydra:search"] = search_doc
    return head[:-1] + ',"hydra:member":[' + ",".join(members) + "]," + dumps(tail)[1:]


def with_context(context: str, document: str) -> str:
    """An item document with `@context` put first, as item responses carry it."""
    return '{"@context":' + dumps(context) + "," + document[1:]


def strip_ld(data: Any) -> Any:
    """The plain-JSON rendering: the same data without JSON-LD keywords."""
    if isinstance(data, dict):
        return {k: strip_ld(v) for k, v in data.items() if not k.startswith("@")}
    if isinstance(data, list):
        return [strip_ld(v) for v in data]
    return data


def error(description: str) -> dict[str, Any]:
    return {
        "@context": "/api/v4/contexts/Error",
        "@type": "hydra:Error",
        "hydra:title": "An error occurred",
        "hydra:description": description,
    }


def problem(description: str) -> dict[str, Any]:
    return {
        "type": "https://tools.ietf.org/html/rfc2616#section-10",
        "title": "An error occurred",
        "detail": description,
    }
