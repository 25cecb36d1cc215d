"""Loopback-only `/_sim/` endpoints that drive the simulator from outside the process
(the demo, receivers under test, benchmarks): JSON in, JSON out.

A browser on the same machine can reach loopback too, so a call that changes anything (any
method but GET and HEAD) must carry `Content-Type: application/json` or `X-Simulator: 1`: a web
page can send neither cross-site without a CORS preflight, which the simulator never grants. A
request from a page whose `Origin` is not loopback is refused outright.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

from watcher.simulator.api import Request, Response, json_response
from watcher.simulator.model import Faults, Simulator

_LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
ADMIN_HEADER = "X-Simulator"
_SAFE_METHODS = ("GET", "HEAD")
Handler = Callable[[Simulator, dict[str, Any], int | None], tuple[int, Any]]


def is_loopback_host(host: str | None) -> bool:
    """Whether a Host header (or an Origin's host and port) names loopback: 127.0.0.1, localhost or
    [::1], with any port."""
    if not host:
        return False
    text = host.strip().lower()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket:
            return False
        port = rest.removeprefix(":") if rest.startswith(":") else None
        if rest and port is None:
            return False
    else:
        name, colon, port_text = text.partition(":")
        port = port_text if colon else None
    if port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return False
    return name.removesuffix(".") in LOOPBACK_NAMES


def _cross_site(request: Request) -> str | None:
    """Why a request may have come from a web page rather than a tool, or None."""
    origin = request.header("origin")
    if origin is not None:
        scheme, sep, rest = origin.partition("://")
        if not sep or scheme not in ("http", "https") or not is_loopback_host(rest):
            return "requests from web pages are refused"
    if request.method in _SAFE_METHODS or request.header(ADMIN_HEADER) == "1":
        return None
    media_type = (request.header("content-type") or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        return f"send Content-Type: application/json or {ADMIN_HEADER}: 1"
    return None


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("timestamps must be ISO 8601 strings")
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("campaign_id must be an integer")
    return value


def _add_lead(sim: Simulator, body: dict[str, Any], _: int | None) -> tuple[int, Any]:
    campaign_id = _optional_int(body.pop("campaign_id", None))
    created = _when(body.pop("created", None))
    visible = bool(body.pop("visible", True))
    return 201, sim.add_lead(campaign_id, created=created, visible=visible, **body)


def _bulk(sim: Simulator, body: dict[str, Any], _: int | None) -> tuple[int, Any]:
    count = body.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError("count must be a positive integer")
    ids = sim.add_leads(count, _optional_int(body.get("campaign_id")), created=_when(body.get("created")))
    return 201, {"count": len(ids), "first_id": ids[0], "last_id": ids[-1]}


def _update_lead(sim: Simulator, body: dict[str, Any], lead_id: int | None) -> tuple[int, Any]:
    assert lead_id is not None
    return 200, sim.update_lead(lead_id, **body)


def _reveal(sim: Simulator, _: dict[str, Any], lead_id: int | None) -> tuple[int, Any]:
    assert lead_id is not None
    sim.reveal_lead(lead_id)
    return 200, sim.lead(lead_id)


def _get_lead(sim: Simulator, _: dict[str, Any], lead_id: int | None) -> tuple[int, Any]:
    assert lead_id is not None
    return 200, sim.lead(lead_id)


def _add_campaign(sim: Simulator, body: dict[str, Any], _: int | None) -> tuple[int, Any]:
    return 201, sim.add_campaign(**body)


def _update_campaign(sim: Simulator, body: dict[str, Any], campaign_id: int | None) -> tuple[int, Any]:
    assert campaign_id is not None
    return 200, sim.update_campaign(campaign_id, **body)


def _pause(sim: Simulator, _: dict[str, Any], campaign_id: int | None) -> tuple[int, Any]:
    assert campaign_id is not None
    return 200, sim.pause_campaign(campaign_id)


def _resume(sim: Simulator, _: dict[str, Any], campaign_id: int | None) -> tuple[int, Any]:
    assert campaign_id is not None
    return 200, sim.resume_campaign(campaign_id)


def _clock(sim: Simulator, body: dict[str, Any], _: int | None) -> tuple[int, Any]:
    advance = body.get("advance", 0)
    if isinstance(advance, bool) or not isinstance(advance, int | float) or advance < 0:
        raise ValueError("advance must be a non-negative number of seconds")
    sim.advance(advance)
    return 200, {"now": sim.now().isoformat()}


def _now(sim: Simulator, _: dict[str, Any], __: int | None) -> tuple[int, Any]:
    return 200, {"now": sim.now().isoformat()}


def _faults(sim: Simulator, body: dict[str, Any], _: int | None) -> tuple[int, Any]:
    with sim.lock:
        sim.faults.update(body)
        return 200, sim.faults.as_dict()


def _get_faults(sim: Simulator, _: dict[str, Any], __: int | None) -> tuple[int, Any]:
    return 200, sim.faults.as_dict()


def _expire(sim: Simulator, _: dict[str, Any], __: int | None) -> tuple[int, Any]:
    sim.expire_tokens()
    return 200, {"expired": True}


def _password_expired(sim: Simulator, body: dict[str, Any], _: int | None) -> tuple[int, Any]:
    value = body.get("expired")
    if not isinstance(value, bool):
        raise ValueError("expired must be a boolean")
    sim.password_expired = value
    return 200, {"password_expired": value}


def _stats(sim: Simulator, _: dict[str, Any], __: int | None) -> tuple[int, Any]:
    return 200, sim.stats()


def _requests(sim: Simulator, _: dict[str, Any], __: int | None) -> tuple[int, Any]:
    with sim.lock:
        return 200, [asdict(r) for r in sim.requests]


@dataclass(frozen=True)
class Route:
    """One admin endpoint: `GET /_sim/` lists them, `simulate --help` and the README describe them."""

    method: str
    path: str  # as shown to people: `{id}` stands for a lead or campaign id
    handler: Handler
    what: str

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.path).replace(re.escape("{id}"), r"(\d+)") + "$")


def _index(_sim: Simulator, _: dict[str, Any], __: int | None) -> tuple[int, Any]:
    return 200, [{"method": r.method, "path": r.path, "what": r.what} for r in ROUTES]


ROUTES: tuple[Route, ...] = (
    Route("GET", "/_sim/", _index, "this list"),
    Route("POST", "/_sim/leads", _add_lead, "add a lead: {campaign_id, created, visible, lead_data, <field>: value}"),
    Route("POST", "/_sim/leads/bulk", _bulk, "add {count} generated leads at once: {count, campaign_id, created}"),
    Route("GET", "/_sim/leads/{id}", _get_lead, "a lead's document, hidden or not"),
    Route("PATCH", "/_sim/leads/{id}", _update_lead, "edit a lead: {<field>: value, lead_data: {name: value}}"),
    Route("POST", "/_sim/leads/{id}/reveal", _reveal, "make a lead added with visible=false visible"),
    Route("POST", "/_sim/campaigns", _add_campaign, "add a campaign: {<field>: value}"),
    Route("PATCH", "/_sim/campaigns/{id}", _update_campaign, "edit a campaign: {<field>: value}"),
    Route("POST", "/_sim/campaigns/{id}/pause", _pause, "pause a campaign (its status becomes Paused)"),
    Route("POST", "/_sim/campaigns/{id}/resume", _resume, "resume a paused campaign"),
    Route("GET", "/_sim/clock", _now, "the simulator's virtual time"),
    Route("POST", "/_sim/clock", _clock, "move the virtual clock forward: {advance: seconds}"),
    Route("GET", "/_sim/faults", _get_faults, "the fault switches in force"),
    Route(
        "POST",
        "/_sim/faults",
        _faults,
        "set fault switches: {" + ", ".join(f.name for f in fields(Faults)) + "}",
    ),
    Route(
        "POST",
        "/_sim/expire-tokens",
        _expire,
        "expire every token issued so far: the next API read is refused with a 401",
    ),
    Route("POST", "/_sim/password-expired", _password_expired, "refuse logins as an expired password: {expired}"),
    Route(
        "GET",
        "/_sim/stats",
        _stats,
        "the virtual time; counts of leads, hidden leads, campaigns, logins, requests, tokens",
    ),
    Route(
        "GET",
        "/_sim/requests",
        _requests,
        "every API request received: method, path, query, status, how it authenticated",
    ),
)


def describe_routes() -> str:
    """The admin API as lines of text, for `simulate --help`."""
    width = max(len(f"{r.method} {r.path}") for r in ROUTES)
    return "\n".join(f"  {f'{r.method} {r.path}':<{width}}  {r.what}" for r in ROUTES)


def _reply(status: int, data: Any) -> Response:
    return json_response(status, data, "application/json")


def handle_admin(sim: Simulator, request: Request) -> Response:
    """Answer one `/_sim/` request; refuses anything but loopback clients."""
    if request.client not in _LOOPBACK:
        return _reply(403, {"error": "the simulator admin API answers loopback clients only"})
    refused = _cross_site(request)
    if refused is not None:
        return _reply(403, {"error": refused})
    allowed = []
    for route in ROUTES:
        match = route.pattern.match(request.path)
        if match is None:
            continue
        if route.method != request.method:
            allowed.append(route.method)
            continue
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            return _reply(400, {"error": "the body must be JSON"})
        if not isinstance(body, dict):
            return _reply(400, {"error": "the body must be a JSON object"})
        try:
            status, data = route.handler(sim, body, int(match.group(1)) if match.groups() else None)
        except KeyError as exc:
            return _reply(404, {"error": str(exc.args[0]) if exc.args else "not found"})
        except (ValueError, TypeError) as exc:
            return _reply(400, {"error": str(exc)})
        return _reply(status, data)
    if allowed:
        return Response(405, b"", {"Allow": ", ".join(allowed)})
    return _reply(404, {"error": f"no simulator endpoint {request.path}"})
