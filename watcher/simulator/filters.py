"""API Platform's Date, Search and Order filters and its pagination, decided from parsed params.

Invalid input is ignored the way the framework ignores it (that filter alone is dropped and
the answer is still 200); only pagination errors are reported, as 400 messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from watcher.simulator.phptime import parse_filter_value
from watcher.simulator.query import Params, Value, php_int, valid_int

MAX_ITEMS_PER_PAGE = 100

DATE_OPERATORS: tuple[tuple[str, str], ...] = (
    ("before", "<="),
    ("strictly_before", "<"),
    ("after", ">="),
    ("strictly_after", ">"),
)
_IRI = re.compile(r"^/api/v4/[a-z-]+/([^/?#]+)$")
_INT_KEY = re.compile(r"^(0|-?[1-9]\d*)$")


class BadRequest(ValueError):
    """A query the framework answers with 400."""


@dataclass(frozen=True)
class Page:
    number: int
    limit: int

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.limit


def pagination(params: Params, default_limit: int, maximum: int = 0) -> Page:
    page = php_int(params.get("page"), 1)
    if page < 1:
        raise BadRequest("Page should not be less than 1")
    limit = min(php_int(params.get("itemsPerPage"), default_limit), maximum or MAX_ITEMS_PER_PAGE)
    if limit < 0:
        raise BadRequest("Limit should not be less than 0")
    if limit == 0 and page > 1:
        raise BadRequest("Page should not be greater than 1 if limit is equal to 0")
    return Page(page, limit)


def search_values(value: Value | None) -> list[str] | None:
    """The exact-match values of one SearchFilter parameter, or None when it is ignored."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    kept = [v for k, v in value.items() if _INT_KEY.match(k) and isinstance(v, str)]
    return kept or None


def id_values(value: Value | None) -> list[int] | None:
    """Integer ids (plain or as IRIs); one bad value makes the whole filter ignored."""
    values = search_values(value)
    if values is None:
        return None
    ids: list[int] = []
    for raw in values:
        iri = _IRI.match(raw)
        number = valid_int(iri.group(1) if iri else raw)
        if number is None:
            return None
        ids.append(number)
    return ids


def date_bounds(value: Value | None, now_wall: int) -> list[tuple[str, int]]:
    """(SQL operator, wall) pairs for one date property; unparseable or unknown operators drop out."""
    if not isinstance(value, dict):
        return []
    bounds: list[tuple[str, int]] = []
    for name, sql in DATE_OPERATORS:
        raw = value.get(name)
        if isinstance(raw, str):
            wall = parse_filter_value(raw, now_wall)
            if wall is not None:
                bounds.append((sql, wall))
    return bounds


def order_keys(params: Params, allowed: tuple[str, ...]) -> list[tuple[str, bool]]:
    """(property, descending) in query order; the id tiebreak comes last as in API Platform 2.4."""
    order = params.get("order")
    keys: list[tuple[str, bool]] = []
    if isinstance(order, dict):
        for prop, direction in order.items():
            valid = prop in allowed and isinstance(direction, str) and direction.lower() in ("asc", "desc")
            if valid and all(prop != seen for seen, _ in keys):
                keys.append((prop, str(direction).lower() == "desc"))
    if all(prop != "id" for prop, _ in keys):
        keys.append(("id", False))
    return keys


@dataclass(frozen=True)
class LeadQuery:
    where: str
    args: tuple[Any, ...]
    order: str


def _in(column: str, values: list[Any], clauses: list[str], args: list[Any]) -> None:
    if len(values) == 1:
        clauses.append(f"{column} = ?")
    else:
        clauses.append(f"{column} IN ({','.join('?' * len(values))})")
    args.extend(values)


def lead_query(params: Params, now_wall: int, updated_filter: bool) -> LeadQuery:
    """The SQL WHERE and ORDER BY for a lead collection request."""
    clauses = ["visible = 1"]
    args: list[Any] = []
    ids = id_values(params.get("id"))
    if ids is not None:
        _in("id", ids, clauses, args)
    emails = search_values(params.get("email"))
    if emails is not None:
        _in("email", emails, clauses, args)
    campaigns = id_values(params.get("campaign.id"))
    if campaigns is not None:
        _in("campaign_id", campaigns, clauses, args)
    dated = ["createdTs", "updatedTs"] if updated_filter else ["createdTs"]
    for prop in dated:
        column = "created_wall" if prop == "createdTs" else "updated_wall"
        for sql, wall in date_bounds(params.get(prop), now_wall):
            clauses.append(f"{column} {sql} ?")
            args.append(wall)
    descending = order_keys(params, ("id",))[0][1]
    return LeadQuery(" AND ".join(clauses), tuple(args), "DESC" if descending else "ASC")


_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
}
CAMPAIGN_DATES = ("createdTs", "updatedTs", "startTs", "endTs")


def campaign_predicate(params: Params, now_wall: int, updated_filter: bool) -> Callable[[Mapping[str, Any]], bool]:
    """A test over campaign rows holding `id`, `name`, `status` and a `walls` map per date property."""
    ids = id_values(params.get("id"))
    names = search_values(params.get("name"))
    statuses = search_values(params.get("status"))
    bounds = [
        (prop, sql, wall)
        for prop in CAMPAIGN_DATES
        if updated_filter or prop != "updatedTs"
        for sql, wall in date_bounds(params.get(prop), now_wall)
    ]

    def matches(row: Mapping[str, Any]) -> bool:
        if ids is not None and row["id"] not in ids:
            return False
        if names is not None and row["name"] not in names:
            return False
        if statuses is not None and row["status"] not in statuses:
            return False
        for prop, sql, wall in bounds:
            value = row["walls"].get(prop)
            if value is None or not _COMPARE[sql](value, wall):
                return False
        return True

    return matches
