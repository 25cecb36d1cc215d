"""The HTTP semantics of Convertr API v4, transport-free: a `Request` in, a `Response` out.

Order of checks follows the Symfony request cycle Convertr runs on: routing, rate limits
and injected faults at the edge, then the OAuth firewall, then API Platform's format
negotiation, item lookup, filters and pagination.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from watcher.simulator import hydra
from watcher.simulator.access import TokenState
from watcher.simulator.filters import BadRequest, lead_query, pagination
from watcher.simulator.model import Simulator
from watcher.simulator.query import Params, parse_query

_FORMATS: dict[str, str] = {"jsonld": "application/ld+json", "json": "application/json"}
_RESOURCE = re.compile(r"^/api/v4/(leads|campaigns)(?:/([^/.]+))?(?:\.([^/.]*))?$")
_BEARER = re.compile(r"Bearer\s(\S+)")
_FORM = re.compile(r"^application/x-www-form-urlencoded([\s|;].*)?$")
_CONTEXT = {"leads": "/api/v4/contexts/Lead", "campaigns": "/api/v4/contexts/Campaign"}
_REALM = 'Bearer realm="Service"'


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    client: str = "127.0.0.1"

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, data: Any, content_type: str, **headers: str) -> Response:
    return Response(status, hydra.dumps(data).encode(), {"Content-Type": content_type, **headers})


def oauth_error(status: int, error: str, description: str, challenge: bool) -> Response:
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if challenge:
        headers["WWW-Authenticate"] = f'{_REALM}, error="{error}", error_description="{description}"'
    return json_response(status, {"error": error, "error_description": description}, "application/json", **headers)


def api_error(status: int, description: str, fmt: str | None, **headers: str) -> Response:
    extra = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "deny", **headers}
    if fmt == "jsonld":
        return json_response(status, hydra.error(description), "application/ld+json; charset=utf-8", **extra)
    return json_response(status, hydra.problem(description), "application/problem+json; charset=utf-8", **extra)


def _form(request: Request) -> Params:
    content_type = request.header("content-type") or ""
    if request.method == "GET" or not _FORM.match(content_type):
        return {}
    return parse_query(request.body.decode("utf-8", errors="replace"))


def token_sources(request: Request) -> tuple[list[str], str]:
    """Every access token the request carries (oauth2-php's three places) and how it came."""
    found: list[tuple[str, str]] = []
    header = request.header("authorization")
    match = _BEARER.search(header) if header else None
    if match:
        found.append(("header", match.group(1)))
    body_token = _form(request).get("access_token")
    if isinstance(body_token, str):
        found.append(("body", body_token))
    query_token = parse_query(request.query).get("access_token")
    if isinstance(query_token, str) and query_token and query_token != "0":
        found.append(("query", query_token))
    kind = "none" if not found else found[0][0] if len(found) == 1 else "multiple"
    return [token for _, token in found], kind


def _authenticate(sim: Simulator, request: Request) -> Response | None:
    tokens, _ = token_sources(request)
    if len(tokens) > 1:
        return oauth_error(
            400,
            "invalid_request",
            "Only one method may be used to authenticate at a time (Auth header, GET or POST).",
            True,
        )
    if not tokens:
        return oauth_error(401, "access_denied", "OAuth2 authentication required", True)
    state = sim.tokens.state(tokens[0], sim.now_ts())
    if state is TokenState.UNKNOWN:
        return oauth_error(401, "invalid_grant", "The access token provided is invalid.", True)
    if state is TokenState.EXPIRED:
        return oauth_error(401, "invalid_grant", "The access token provided has expired.", True)
    if sim.password_expired:
        return oauth_error(401, "access_denied", "Credentials have expired.", True)
    return None


def _token_body(sim: Simulator, with_user: bool) -> dict[str, Any]:
    access, refresh = sim.tokens.issue(sim.now_ts(), sim.token_lifetime)
    body: dict[str, Any] = {
        "access_token": access,
        "expires_in": sim.token_lifetime,
        "token_type": "bearer",
        "scope": None,
        "refresh_token": refresh,
    }
    if with_user:
        body.update(
            client_id=sim.tokens.client_id,
            client_secret=sim.tokens.client_secret,
            user_id=sim.user_id,
            password_expired=sim.password_expired,
        )
    return body


def _token_ok(body: dict[str, Any]) -> Response:
    return json_response(200, body, "application/json", **{"Cache-Control": "no-store", "Pragma": "no-cache"})


def login(sim: Simulator, request: Request) -> Response:
    """`POST /api/login`: the password grant with the client implied."""
    return _password_grant(sim, _form(request))


def _password_grant(sim: Simulator, form: Params, with_user: bool = True) -> Response:
    username, password = form.get("username"), form.get("password")
    if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
        return oauth_error(400, "invalid_request", 'Missing parameters. "username" and "password" required', False)
    if username != sim.username or password != sim.password:
        return oauth_error(400, "invalid_grant", "Invalid username and password combination", False)
    return _token_ok(_token_body(sim, with_user))


def oauth_token(sim: Simulator, request: Request) -> Response:
    """`/oauth/v2/token`: the legacy password grant and refresh-token rotation."""
    data = _form(request) if request.method == "POST" else parse_query(request.query)
    grant = data.get("grant_type")
    if grant not in ("password", "refresh_token"):
        return oauth_error(400, "invalid_request", "Invalid grant_type parameter or parameter missing", False)
    if data.get("client_id") != sim.tokens.client_id or data.get("client_secret") != sim.tokens.client_secret:
        return oauth_error(400, "invalid_client", "The client credentials are invalid", False)
    if grant == "password":
        return _password_grant(sim, data, with_user=False)
    refresh = data.get("refresh_token")
    if not isinstance(refresh, str) or not refresh:
        return oauth_error(400, "invalid_request", 'No "refresh_token" parameter found', False)
    state = sim.tokens.use_refresh(refresh, sim.now_ts())
    if state is TokenState.UNKNOWN:
        return oauth_error(400, "invalid_grant", "Invalid refresh token", False)
    if state is TokenState.EXPIRED:
        return oauth_error(400, "invalid_grant", "Refresh token has expired", False)
    return _token_ok(_token_body(sim, with_user=False))


def _accept_ranges(accept: str) -> list[tuple[str, float]]:
    ranges = []
    for part in accept.split(","):
        pieces = [p.strip() for p in part.split(";")]
        if not pieces[0]:
            continue
        q = 1.0
        for param in pieces[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranges.append((pieces[0].lower(), q))
    return ranges


def negotiate(accept: str | None, offered: list[str]) -> str | None:
    """The format whose MIME type the Accept header ranks best (first offered when absent)."""
    if not accept or not accept.strip():
        return offered[0]
    ranges = _accept_ranges(accept)
    best: tuple[float, int, int] | None = None
    chosen = None
    for position, fmt in enumerate(offered):
        mime = _FORMATS[fmt]
        kind = mime.split("/")[0]
        for index, (pattern, q) in enumerate(ranges):
            specificity = 2 if pattern == mime else 1 if pattern == f"{kind}/*" else 0 if pattern == "*/*" else -1
            if specificity < 0 or q <= 0:
                continue
            score = (q, specificity, -index * 10 - position)
            if best is None or score > best:
                best, chosen = score, fmt
    return chosen


def resource(sim: Simulator, request: Request, name: str, item: str | None, ext: str | None) -> Response:
    """`/api/v4/leads` and `/api/v4/campaigns`, as collections or items, after authentication."""
    if request.method != "GET":
        description = f'No route found for "{request.method} {request.path}": Method Not Allowed (Allow: GET)'
        return api_error(405, description, None, Allow="GET")
    if ext is not None and ext not in _FORMATS:
        return api_error(404, f'Format "{ext}" is not supported', None)
    offered = [ext] if ext is not None else list(_FORMATS)
    fmt = negotiate(request.header("accept"), offered)
    if fmt is None:
        mimes = '", "'.join(_FORMATS[f] for f in offered)
        accept = request.header("accept")
        return api_error(406, f'Requested format "{accept}" is not supported. Supported MIME types are "{mimes}".', ext)
    content_type = _FORMATS[fmt] + "; charset=utf-8"
    headers = {
        "Vary": "Accept",
        "Link": '</api/v4/docs.jsonld>; rel="http://www.w3.org/ns/hydra/core#apiDocumentation"',
    }
    if item is not None:
        try:
            text = _item(sim, name, item)
        except _Unserialisable:
            return api_error(500, "Internal Server Error", fmt)
        if text is None:
            return api_error(404, "Not Found", fmt)
        body = (
            hydra.with_context(_CONTEXT[name], text)
            if fmt == "jsonld"
            else hydra.dumps(hydra.strip_ld(json.loads(text)))
        )
        return Response(200, body.encode(), {"Content-Type": content_type, **headers})
    params = parse_query(request.query)
    try:
        page = pagination(params, sim.items_per_page_default, sim.faults.max_items_per_page)
    except BadRequest as exc:
        return api_error(400, str(exc), fmt)
    updated_filter = not sim.faults.drop_updated_ts_filter
    with sim.lock:
        if name == "leads":
            total, members = sim.lead_page(lead_query(params, sim.now_wall(), updated_filter), page)
            if sim.poisoned and any(json.loads(m).get("id") in sim.poisoned for m in members):
                return api_error(500, "Internal Server Error", fmt)
        else:
            total, docs = sim.campaign_page(params, page, updated_filter)
            members = [hydra.dumps(d) for d in docs]
    if fmt == "json":
        body = "[" + ",".join(hydra.dumps(hydra.strip_ld(json.loads(m))) for m in members) + "]"
    else:
        params.pop("page", None)
        view = hydra.view(request.path, params, page.number, hydra.last_page(total, page.limit), sim.faults.legacy_next)
        variables = hydra.LEAD_VARIABLES if name == "leads" else hydra.CAMPAIGN_VARIABLES
        search = hydra.search(f"/api/v4/{name}", variables, not updated_filter)
        body = hydra.collection(_CONTEXT[name], f"/api/v4/{name}", members, total, view, search)
    return Response(200, body.encode(), {"Content-Type": content_type, **headers})


class _Unserialisable(Exception):
    """A poisoned lead: the serialiser fails on it."""


def _item(sim: Simulator, name: str, item: str) -> str | None:
    if not item.isdigit():
        return None
    if name == "leads":
        if int(item) in sim.poisoned:
            raise _Unserialisable
        return sim.lead_document(int(item))
    doc = sim.campaign_document(int(item))
    return None if doc is None else hydra.dumps(doc)


def _route(sim: Simulator, request: Request) -> Response:
    if request.path == "/api/login":
        if request.method != "POST":
            return api_error(
                405,
                f'No route found for "{request.method} /api/login": Method Not Allowed (Allow: POST)',
                None,
                Allow="POST",
            )
        return login(sim, request)
    if request.path == "/oauth/v2/token" and request.method in ("GET", "POST"):
        return oauth_token(sim, request)
    match = _RESOURCE.match(request.path)
    if match is None:
        return api_error(404, f'No route found for "{request.method} {request.path}"', None)
    denied = _authenticate(sim, request)
    if denied is not None:
        return denied
    if sim.faults.token_rejections > 0:
        sim.faults.token_rejections -= 1
        return oauth_error(401, "invalid_grant", "The access token provided is invalid.", True)
    return resource(sim, request, match.group(1), match.group(2), match.group(3))


_PROXY_PAGE = "<html><head><title>{0}</title></head><body><center><h1>{0}</h1></center></body></html>\n"


def _html(status: int, title: str) -> Response:
    return Response(status, _PROXY_PAGE.format(title).encode(), {"Content-Type": "text/html"})


def _proxy_page(sim: Simulator, request: Request) -> Response | None:
    """What a proxy, firewall or maintenance page in front of Convertr answers, if one is injected."""
    faults = sim.faults
    if faults.login_html_403 > 0 and request.path == "/api/login":
        faults.login_html_403 -= 1
        return _html(403, "403 Forbidden")
    if faults.html_401 > 0 and request.path.startswith("/api/v4/"):
        faults.html_401 -= 1
        return _html(401, "401 Authorization Required")
    if faults.proxy_403_rate > 0 and sim.fault_rng.random() < faults.proxy_403_rate:
        return _html(403, "403 Forbidden")
    return None


def _fault_or_limit(sim: Simulator, request: Request) -> Response | None:
    """Injected proxy pages and 429s, the real rolling limits, then random 5xx: answered before any real work."""
    faults = sim.faults
    page = _proxy_page(sim, request)
    if page is not None:
        return page
    if faults.rate_limit_429 > 0:
        faults.rate_limit_429 -= 1
        return api_error(429, "Too Many Requests", "jsonld", **{"Retry-After": f"{faults.retry_after:g}"})
    if sim.rate_limit:
        now = sim.clock.now() + sim.offset
        wait = sim.login_limit.admit(now) if request.path == "/api/login" else None
        if wait is None:
            wait = sim.request_limit.admit(now)
        if wait is not None:
            return api_error(429, "Too Many Requests", "jsonld", **{"Retry-After": f"{wait:g}"})
    if faults.error_rate > 0 and sim.fault_rng.random() < faults.error_rate:
        status = sim.fault_rng.choice((500, 502, 503))
        if status == 500:
            return api_error(500, "Internal Server Error", "jsonld")
        return _html(status, "502 Bad Gateway" if status == 502 else "503 Service Temporarily Unavailable")
    return None


def _drift(body: bytes) -> bytes:
    """A newer or older Convertr: some lead fields missing, an unknown one added."""
    doc = json.loads(body)
    members = doc.get("hydra:member", doc) if isinstance(doc, dict) else doc
    for lead in members if isinstance(members, list) else [doc]:
        if isinstance(lead, dict) and "id" in lead:
            lead.pop("score", None)
            lead.pop("leadFlag", None)
            lead["futureField"] = {"introduced": "later"}
    return json.dumps(doc).encode()


def handle(sim: Simulator, request: Request) -> Response:
    """Answer one API request (not `/_sim/`), recording it."""
    with sim.lock:
        response = _fault_or_limit(sim, request)
        if response is None:
            if request.path == "/api/login" and request.method == "POST":
                sim.logins += 1
            response = _route(sim, request)
            if sim.faults.schema_drift and response.status == 200 and request.path.startswith("/api/v4/leads"):
                response.body = _drift(response.body)
            malformed = sim.faults.malformed_rate
            if response.status == 200 and malformed > 0 and sim.fault_rng.random() < malformed:
                response.body = response.body[: len(response.body) // 2]
        sim.record(request.method, request.path, request.query, response.status, token_sources(request)[1])
    return response
