"""Learning how the server's time filters behave, from the server itself, once per process.

The newest lead teaches the zone's current offset (`ServerClock` keeps every zone that fits)
and is the test case for the filter: a `createdTs[strictly_after]` bound one second before it
must return it, and one two days after it must not. A server whose digits run behind the offsets
it writes fails the first check; the bound is then moved back an hour at a time until it passes,
and every later bound with it. Nothing is guessed silently: each finding is a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog

from watcher import detect
from watcher.convertr import ConvertrClient, Page
from watcher.errors import ApiError, MalformedResponse, ResponseTooLarge, ServerFault
from watcher.servertime import HOUR, ServerClock, write_at

log = structlog.get_logger("watcher.calibration")

CREATED_FILTER = "createdTs[strictly_after]"
CALIBRATION_HOURS = 26  # the widest gap between two zones' digits, plus a spare hour
LEAD_TIMES = ("createdTs", "updatedTs")


@dataclass
class Calibration:
    """What the server showed of its time filters."""

    zone: str  # `ServerClock.describe()`
    checked: str  # how the filter semantics were checked, or why they could not be
    search: frozenset[str] = frozenset()  # the leads collection's hydra:search variables
    filter_ignored: bool = False
    verified: bool = False  # the filter was checked against a lead (else: check again on the next poll)
    warnings: list[str] = field(default_factory=list)


def _params(campaign_ids: Sequence[int], bound: str | None = None) -> dict[str, str | Sequence[str]]:
    params: dict[str, str | Sequence[str]] = {CREATED_FILTER: bound} if bound else {}
    params["order[id]"] = "desc"
    if campaign_ids:
        params["campaign.id[]"] = [str(c) for c in campaign_ids]
    return params


async def _newest(client: ConvertrClient, server: ServerClock, params: dict[str, Any]) -> Page:
    page = await client.page("leads", params, items_per_page=1)
    server.observe_date(page.server_date)
    server.observe_documents(page.members, LEAD_TIMES)
    return page


async def calibrate(client: ConvertrClient, server: ServerClock, campaign_ids: Sequence[int] = ()) -> Calibration:
    """Learn the zone from the newest lead and check the createdTs filter against it."""
    calibration = Calibration(zone="", checked="")
    try:
        newest = await _newest(client, server, _params(campaign_ids))
    except (ServerFault, MalformedResponse, ResponseTooLarge) as exc:
        # An unreadable newest lead must not stop every walk: the walks isolate it, and the zone
        # is learnt from the leads they read.
        newest = await client.page("leads", _params(campaign_ids), items_per_page=0)
        server.observe_date(newest.server_date)
        calibration.checked = f"not checked: the newest lead cannot be read ({exc})"
    calibration.search = newest.search_variables
    lead = newest.members[0] if newest.members else None
    created = detect.timestamp(lead.get("createdTs")) if lead else None
    if lead is None or created is None:
        calibration.checked = calibration.checked or "not checked: no lead to check the createdTs filter against"
        # Until a lead shows how the filter compares, every bound is as wide as any zone could need.
        server.correction = CALIBRATION_HOURS * HOUR
    else:
        await _check_filters(client, server, campaign_ids, lead, created, calibration)
    calibration.zone = server.describe()
    if server.disagreement:
        calibration.warnings.append(f"[convertr] timezone: {server.disagreement}")
    for warning in calibration.warnings:
        log.warning(warning)
    log.info("convertr.calibrated", zone=calibration.zone, filters=calibration.checked)
    return calibration


async def _check_filters(
    client: ConvertrClient,
    server: ServerClock,
    campaign_ids: Sequence[int],
    lead: dict[str, Any],
    created: float,
    calibration: Calibration,
) -> None:
    for hours in range(CALIBRATION_HOURS + 1):
        server.correction = hours * HOUR
        probe = await _newest(client, server, _params(campaign_ids, server.bound(created - 1)))
        # A lead created since (seconds ago, under steady arrivals) passes the same bound.
        if probe.members and _at_least(probe.members[0].get("id"), lead.get("id")):
            break
    else:
        server.correction = 0.0
        raise ApiError(
            "Convertr GET /api/v4/leads: createdTs[strictly_after] does not return the newest lead even with "
            "a bound a day before it; the watcher cannot tell which leads are new"
        )
    calibration.checked = "a bound 1 s before the newest lead returns it"
    calibration.verified = True
    if hours:
        calibration.warnings.append(
            f"Convertr compares createdTs {hours} h behind the offsets it writes: every filter bound is moved back"
        )
    offset = detect.parse_ts(str(lead.get("createdTs"))).utcoffset() or timedelta()
    probe = await _newest(client, server, _params(campaign_ids, write_at(created + 2 * 86400, offset)))
    if probe.members:  # nothing is created two days from now: the filter was not applied
        calibration.filter_ignored = True
        calibration.warnings.append(
            "Convertr ignores createdTs[strictly_after]: every walk reads every lead (nothing is missed, "
            "but it costs a request per page of the whole collection)"
        )
    else:
        calibration.checked += "; a bound after it does not"


def _at_least(found: object, wanted: object) -> bool:
    return isinstance(found, int) and isinstance(wanted, int) and found >= wanted
