"""The Convertr API client: edge cases against httpx.MockTransport, walks against the simulator."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import math
import subprocess
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest

from watcher import __version__
from watcher.clock import FakeClock
from watcher.config import ConvertrConfig
from watcher.convertr import (
    RETRY_ATTEMPTS,
    ConvertrClient,
    Page,
    RollingWindow,
    page_of,
    template_variables,
)
from watcher.errors import ApiError, AuthError, RateLimited, TransientError
from watcher.simulator import Simulator, SimulatorServer

T = TypeVar("T")

USERNAME = "api@acme.example"
PASSWORD = "s3cret-Pa55word"
BASE = "http://convertr.test"
SEARCH = {
    "@type": "hydra:IriTemplate",
    "hydra:template": "/api/v4/leads{?id,id[],campaign.id[],createdTs[after]}",
}


def run(coro: Awaitable[T]) -> T:
    """Run one coroutine to completion on a fresh event loop."""

    async def main() -> T:
        return await coro

    return asyncio.run(main())


def config(**overrides: Any) -> ConvertrConfig:
    values: dict[str, Any] = {"base_url": BASE, "username": USERNAME, "password": PASSWORD}
    values.update(overrides)
    return ConvertrConfig(**values)


class FakeApi:
    """A scripted Convertr: logins mint tokens, collections page through `total` synthetic leads."""

    def __init__(self, total: int = 0, *, expires_in: int = 3600, prefixed: bool = True) -> None:
        self.total = total
        self.expires_in = expires_in
        self.prefixed = prefixed
        self.requests: list[httpx.Request] = []
        self.logins = 0
        self.valid: set[str] = set()
        self.login_reply: httpx.Response | None = None
        self.script: list[httpx.Response | Exception] = []  # served to collection GETs first
        self.legacy_next = False
        self.with_view = True
        self.date = "Tue, 14 Nov 2023 22:13:20 GMT"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/api/login":
            return self.login(request)
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.valid:
            return httpx.Response(
                401,
                json={
                    "error": "invalid_grant",
                    "error_description": "The access token provided has expired.",
                },
            )
        if self.script:
            item = self.script.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        return self.collection(request)

    def login(self, request: httpx.Request) -> httpx.Response:
        self.logins += 1
        if self.login_reply is not None:
            return self.login_reply
        form = dict(parse_qsl(request.content.decode()))
        if form != {"username": USERNAME, "password": PASSWORD}:
            return httpx.Response(400, json={"error": "invalid_grant", "error_description": "Invalid username"})
        token = f"tok{self.logins}-ZmI2ZjE4OGVkMDhj"
        self.valid.add(token)
        return httpx.Response(200, json={"access_token": token, "expires_in": self.expires_in, "user_id": 7})

    def expire(self) -> None:
        self.valid.clear()

    def key(self, name: str) -> str:
        return f"hydra:{name}" if self.prefixed else name

    def collection(self, request: httpx.Request) -> httpx.Response:
        query = dict(parse_qsl(request.url.query.decode()))
        size = int(query.get("itemsPerPage", "30"))
        page = int(query.get("page", "1"))
        last = max(1, math.ceil(self.total / size))
        start = (page - 1) * size
        members = [{"@id": f"/api/v4/leads/{i}", "id": i} for i in range(start + 1, min(self.total, start + size) + 1)]
        body: dict[str, Any] = {
            "@id": "/api/v4/leads",
            self.key("member"): members,
            self.key("totalItems"): self.total,
            self.key("search"): SEARCH,
        }
        rest = {k: v for k, v in query.items() if k != "page"}
        if self.with_view and last > 1:
            view = {
                "@id": f"/api/v4/leads?{urlencode({**rest, 'page': page})}",
                self.key("first"): f"/api/v4/leads?{urlencode({**rest, 'page': 1})}",
                self.key("last"): f"/api/v4/leads?{urlencode({**rest, 'page': last})}",
            }
            if page < last or (self.legacy_next and page != last):
                view[self.key("next")] = f"/api/v4/leads?{urlencode({**rest, 'page': page + 1})}"
            body[self.key("view")] = view
        return httpx.Response(200, json=body, headers={"Date": self.date})

    def gets(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path != "/api/login"]


def client_for(api: Callable[[httpx.Request], httpx.Response], clock: FakeClock, **overrides: Any) -> ConvertrClient:
    return ConvertrClient(config(**overrides), clock=clock, transport=httpx.MockTransport(api))


async def walk(client: ConvertrClient, collection: str = "leads", **kwargs: Any) -> list[Page]:
    return [page async for page in client.pages(collection, **kwargs)]


def error_json(status: int, description: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"@type": "hydra:Error", "hydra:title": "An error occurred", "hydra:description": description}
    return httpx.Response(status, json=body, headers=headers)


# ---------------------------------------------------------------- requests on the wire


def test_requests_carry_bearer_accept_and_user_agent_only() -> None:
    """Every collection GET sends the token in the Authorization header, never in the query string."""
    api, clock = FakeApi(5), FakeClock()

    async def go() -> None:
        async with client_for(api, clock) as client:
            await walk(client)

    run(go())
    login, get = api.requests
    assert login.method == "POST" and login.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert get.headers["Authorization"] == "Bearer tok1-ZmI2ZjE4OGVkMDhj"
    assert get.headers["Accept"] == "application/ld+json"
    assert get.headers["User-Agent"] == f"convertr-watcher/{__version__}"
    assert "access_token" not in str(get.url) and "tok1" not in str(get.url)


def test_filter_values_are_percent_encoded_and_lists_repeat() -> None:
    """An offset's `+` goes out as %2B, brackets are encoded, list params repeat, page comes last."""
    api, clock = FakeApi(1), FakeClock()
    params = {"createdTs[after]": "2024-04-01T10:00:00+01:00", "campaign.id[]": ["601", "602"]}

    async def go() -> None:
        async with client_for(api, clock, items_per_page=50) as client:
            await walk(client, params=params)

    run(go())
    raw = api.gets()[0].url.raw_path.decode()
    assert "createdTs%5Bafter%5D=2024-04-01T10%3A00%3A00%2B01%3A00" in raw
    assert "+" not in raw
    assert raw.endswith("&campaign.id%5B%5D=601&campaign.id%5B%5D=602&itemsPerPage=50&page=1")


def test_caller_may_not_set_page_or_items_per_page() -> None:
    """Paging parameters belong to the client; passing one is a programming error."""
    api, clock = FakeApi(1), FakeClock()

    async def go() -> None:
        async with client_for(api, clock) as client:
            await walk(client, params={"page": "2"})

    with pytest.raises(ValueError, match="page"):
        run(go())


# ---------------------------------------------------------------- paging


def test_walk_stops_at_hydra_last() -> None:
    """250 leads at 100 a page are three pages, then no fourth request."""
    api, clock = FakeApi(250), FakeClock()

    async def go() -> list[Page]:
        async with client_for(api, clock) as client:
            return await walk(client)

    pages = run(go())
    assert [len(p.members) for p in pages] == [100, 100, 50]
    assert [p.last_page for p in pages] == [3, 3, 3]
    assert pages[0].total == 250
    assert pages[0].search_variables == frozenset({"id", "id[]", "campaign.id[]", "createdTs[after]"})
    assert pages[0].server_date == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert len(api.gets()) == 3


def test_legacy_next_past_the_last_page_is_not_followed() -> None:
    """A pre-2.5.5 server links `next` beyond the last page; a walk from there still ends."""
    api, clock = FakeApi(250), FakeClock()
    api.legacy_next = True

    async def go() -> list[Page]:
        async with client_for(api, clock) as client:
            return await walk(client, start_page=5)

    pages = run(go())
    assert [(p.number, len(p.members)) for p in pages] == [(5, 0)]


def test_unprefixed_member_total_and_view_keys() -> None:
    """API Platform 4 without the hydra prefix pages the same way."""
    api, clock = FakeApi(120, prefixed=False), FakeClock()

    async def go() -> list[Page]:
        async with client_for(api, clock) as client:
            return await walk(client)

    pages = run(go())
    assert [len(p.members) for p in pages] == [100, 20]
    assert pages[0].last_page == 2 and pages[0].total == 120
    assert "campaign.id[]" in pages[0].search_variables


def test_without_a_view_the_last_page_is_computed_and_a_short_page_ends() -> None:
    """With no hydra:view, totalItems/itemsPerPage gives last_page and a short page stops the walk."""
    api, clock = FakeApi(130), FakeClock()
    api.with_view = False

    async def go() -> list[Page]:
        async with client_for(api, clock) as client:
            return await walk(client)

    pages = run(go())
    assert [(p.number, p.last_page, len(p.members)) for p in pages] == [(1, 2, 100), (2, 2, 30)]


def test_without_view_or_total_a_short_page_ends() -> None:
    """A bare member list pages until a page comes back short."""
    api, clock = FakeApi(0), FakeClock()
    full = [{"id": i} for i in range(10)]
    api.script = [
        httpx.Response(200, json={"hydra:member": full}),
        httpx.Response(200, json={"hydra:member": full[:3]}),
    ]

    async def go() -> list[Page]:
        async with client_for(api, clock, items_per_page=10) as client:
            return await walk(client)

    pages = run(go())
    assert [(p.number, p.total, p.last_page, len(p.members)) for p in pages] == [
        (1, None, None, 10),
        (2, None, None, 3),
    ]


def test_page_makes_one_request_each() -> None:
    """page honours its own itemsPerPage and page number (1 by default), one request each."""
    api, clock = FakeApi(250), FakeClock()

    async def go() -> tuple[Page, Page, int]:
        async with client_for(api, clock) as client:
            first = await client.page("leads", {"order[id]": "desc"}, items_per_page=1)
            third = await client.page("leads", {"order[id]": "asc"}, number=3, items_per_page=7)
            return first, third, client.request_count

    first, third, count = run(go())
    assert first.last_page == 250 and len(first.members) == 1
    assert third.number == 3 and len(third.members) == 7
    assert first.server_date == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert count == 3  # one login, two reads
    paths = [r.url.raw_path.decode() for r in api.gets()]
    assert "itemsPerPage=1&page=1" in paths[0] and "itemsPerPage=7&page=3" in paths[1]


def test_collection_name_is_validated() -> None:
    """A collection name cannot smuggle a path or query into the URL."""
    api, clock = FakeApi(1), FakeClock()

    async def go() -> None:
        async with client_for(api, clock) as client:
            await client.page("leads?x=1")

    with pytest.raises(ValueError):
        run(go())
    assert api.requests == []


# ---------------------------------------------------------------- retries


def test_retry_after_seconds_is_honoured_exactly() -> None:
    """A 429 with Retry-After: 7 sleeps 7 s on the injected clock, then succeeds."""
    api, clock = FakeApi(3), FakeClock()
    api.script = [httpx.Response(429, headers={"Retry-After": "7"})]

    async def go() -> list[Page]:
        async with client_for(api, clock) as client:
            return await walk(client)

    pages = run(go())
    assert len(pages[0].members) == 3
    assert clock.slept == [7.0]


def test_retry_after_http_date_is_relative_to_the_clock_and_capped() -> None:
    """An HTTP-date Retry-After waits until that instant; anything beyond 60 s is capped."""
    api, clock = FakeApi(3), FakeClock()
    soon = email.utils.formatdate(clock.now() + 20, usegmt=True)
    api.script = [
        httpx.Response(503, headers={"Retry-After": soon}),
        httpx.Response(429, headers={"Retry-After": "3600"}),
    ]

    async def go() -> None:
        async with client_for(api, clock) as client:
            await walk(client)

    run(go())
    assert clock.slept == [20.0, 60.0]


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_client_errors_are_not_retried(status: int) -> None:
    """Other 4xx answers raise ApiError at once, with the status and a short reason."""
    api, clock = FakeApi(3), FakeClock()
    api.script = [error_json(status, "Page should not be less than 1")]

    async def go() -> None:
        async with client_for(api, clock) as client:
            await walk(client, params={"email": "jane@example.com"})

    with pytest.raises(ApiError) as caught:
        run(go())
    assert caught.value.status == status
    assert str(caught.value) == f"Convertr GET /api/v4/leads: {status} Page should not be less than 1"
    assert len(api.gets()) == 1 and clock.slept == []


def test_malformed_json_is_retried() -> None:
    """A 200 whose body is not JSON is transient: the next attempt gets the page."""
    api, clock = FakeApi(3), FakeClock()
    api.script = [httpx.Response(200, content=b"<html>proxy says hi"), httpx.Response(200, json=[1, 2])]

    async def go() -> list[Page]:
        async with client_for(api, clock) as client:
            return await walk(client)

    pages = run(go())
    assert len(pages[0].members) == 3
    assert len(api.gets()) == 3 and len(clock.slept) == 2
    assert 0.5 <= clock.slept[0] <= 1.0 and 1.0 <= clock.slept[1] <= 1.5  # exponential with jitter


def test_500_and_transport_errors_are_retried() -> None:
    """A masked 500, a 502 and a dropped connection are all retried on a GET."""
    api, clock = FakeApi(3), FakeClock()
    api.script = [
        error_json(500, "Internal Server Error"),
        httpx.Response(502),
        httpx.ConnectError("refused"),
    ]

    async def go() -> list[Page]:
        async with client_for(api, clock) as client:
            return await walk(client)

    assert len(run(go())[0].members) == 3
    assert len(api.gets()) == 4


def test_exhausted_retries_raise_the_last_transient_error() -> None:
    """Five failed attempts end with the last error itself, a RateLimited here."""
    api, clock = FakeApi(3), FakeClock()
    api.script.extend([httpx.Response(503)] * 4 + [httpx.Response(429, headers={"Retry-After": "2"})])

    async def go() -> None:
        async with client_for(api, clock) as client:
            await walk(client)

    with pytest.raises(RateLimited) as caught:
        run(go())
    assert caught.value.retry_after == 2.0 and caught.value.status == 429
    assert len(api.gets()) == 5 and len(clock.slept) == 4


def test_retries_stop_at_the_total_time_bound() -> None:
    """Long Retry-After waits end the retries once two minutes would be exceeded."""
    api, clock = FakeApi(3), FakeClock()
    api.script = [httpx.Response(429, headers={"Retry-After": "50"})] * 5

    async def go() -> None:
        async with client_for(api, clock) as client:
            await walk(client)

    with pytest.raises(RateLimited):
        run(go())
    assert clock.slept == [50.0, 50.0]
    assert len(api.gets()) == 3


def test_timeouts_and_read_errors_become_transient_errors() -> None:
    """httpx exceptions never escape: the caller sees TransientError."""
    api, clock = FakeApi(3), FakeClock()
    api.script.extend([httpx.ReadTimeout("slow")] * 4 + [httpx.ReadError("reset")])

    async def go() -> None:
        async with client_for(api, clock) as client:
            await walk(client)

    with pytest.raises(TransientError) as caught:
        run(go())
    assert type(caught.value) is TransientError
    assert str(caught.value) == "Convertr GET /api/v4/leads: ReadError"


# ---------------------------------------------------------------- authentication


def test_token_expiring_mid_walk_triggers_one_relogin() -> None:
    """A 401 on page 2 logs in once more and the walk carries on."""
    api, clock = FakeApi(250), FakeClock()

    async def go() -> list[Page]:
        pages = []
        async with client_for(api, clock) as client:
            async for page in client.pages("leads"):
                pages.append(page)
                api.expire()
        return pages

    pages = run(go())
    assert [len(p.members) for p in pages] == [100, 100, 50]
    tokens = [r.headers["Authorization"][7:11] for r in api.gets()]
    # Each refused GET (a token already expired) is followed by exactly one login and a retry with the new token.
    refused = sum(1 for a, b in itertools.pairwise(tokens) if a != b)
    assert refused >= 1
    assert api.logins == 1 + refused
    assert len(tokens) == 3 + refused


def test_second_401_is_an_auth_error() -> None:
    """A token refused right after a fresh login means the account cannot read: AuthError."""
    api, clock = FakeApi(3), FakeClock()
    deny = httpx.Response(401, json={"error": "access_denied", "error_description": "Credentials have expired."})
    api.script = [deny, deny]

    async def go() -> None:
        async with client_for(api, clock) as client:
            await walk(client)

    with pytest.raises(AuthError, match="401 even with a fresh token"):
        run(go())
    assert api.logins == 2 and len(api.gets()) == 2


def test_token_is_renewed_before_it_expires() -> None:
    """With expires_in=100 the client logs in again after 90 s without waiting for a 401."""
    api, clock = FakeApi(3, expires_in=100), FakeClock()

    async def go() -> None:
        async with client_for(api, clock) as client:
            await client.page("leads")
            clock.advance(89)
            await client.page("leads")
            clock.advance(2)
            await client.page("leads")

    run(go())
    assert api.logins == 2
    assert all(r.headers["Authorization"] != "" for r in api.gets())
    assert [r.headers["Authorization"][7:11] for r in api.gets()] == ["tok1", "tok1", "tok2"]


@pytest.mark.parametrize("status", [400, 401])
def test_refused_login_is_an_auth_error_without_retry(status: int) -> None:
    """Wrong credentials give one plain AuthError naming the user, never the password."""
    api, clock = FakeApi(3), FakeClock()
    api.login_reply = httpx.Response(
        status, json={"error": "invalid_grant", "error_description": f"Invalid password {PASSWORD}"}
    )

    async def go() -> None:
        async with client_for(api, clock) as client:
            await client.login()

    with pytest.raises(AuthError) as caught:
        run(go())
    assert str(caught.value) == f"Convertr refused the login for {USERNAME}: invalid_grant"
    assert api.logins == 1 and clock.slept == []


def test_expired_password_is_an_auth_error() -> None:
    """A login answered with password_expired tells the operator to change the password."""
    api, clock = FakeApi(3), FakeClock()
    api.login_reply = httpx.Response(200, json={"access_token": "abc", "expires_in": 3600, "password_expired": True})

    async def go() -> None:
        async with client_for(api, clock) as client:
            await walk(client)

    with pytest.raises(AuthError, match=r"password of api@acme\.example has expired: change it") as caught:
        run(go())
    assert "abc" not in str(caught.value) and PASSWORD not in str(caught.value)
    assert api.gets() == []


def test_mfa_challenge_is_an_auth_error() -> None:
    """An MFA challenge cannot be answered by a daemon: AuthError, no retry."""
    api, clock = FakeApi(3), FakeClock()
    api.login_reply = httpx.Response(200, json={"error": "Mfa Required", "mfa_token": "m-123"})

    async def go() -> None:
        async with client_for(api, clock) as client:
            await client.login()

    with pytest.raises(AuthError, match="multi-factor"):
        run(go())
    assert api.logins == 1


def test_login_transient_failure_is_retried() -> None:
    """A 503 on the login is retried like any other transient failure."""
    api, clock = FakeApi(3), FakeClock()
    replies = [httpx.Response(503, headers={"Retry-After": "4"})]
    original = api.login

    def flaky(request: httpx.Request) -> httpx.Response:
        return replies.pop(0) if replies else original(request)

    api.login = flaky  # type: ignore[method-assign]

    async def go() -> None:
        async with client_for(api, clock) as client:
            await client.login()
            await walk(client)

    run(go())
    assert clock.slept == [4.0]


def test_concurrent_callers_share_one_login() -> None:
    """Eight reads started together wait for a single login."""
    api, clock = FakeApi(3), FakeClock()

    async def go() -> None:
        async with client_for(api, clock) as client:
            await asyncio.gather(*(client.page("leads") for _ in range(8)))

    run(go())
    assert api.logins == 1 and len(api.gets()) == 8


def test_error_messages_hold_no_query_token_or_password() -> None:
    """Error texts name the path only and mask secrets the server might echo."""
    api, clock = FakeApi(3), FakeClock()

    def echo(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/login":
            return api(request)
        token = request.headers["Authorization"][7:]
        return error_json(403, f"token {token} may not read; password {PASSWORD}")

    async def go() -> None:
        async with client_for(echo, clock) as client:
            await walk(client, params={"email": "jane@example.com"})

    with pytest.raises(ApiError) as caught:
        run(go())
    text = str(caught.value)
    assert "tok1" not in text and PASSWORD not in text and "jane" not in text
    assert text == "Convertr GET /api/v4/leads: 403 token *** may not read; password ***"


# ---------------------------------------------------------------- budget, concurrency, metrics


def test_budget_waits_for_a_slot_in_the_rolling_window() -> None:
    """With a budget of 3 per 300 s the fourth request sleeps until the first leaves the window."""
    api, clock = FakeApi(3), FakeClock()

    async def go() -> None:
        async with client_for(api, clock, request_budget=3) as client:
            await client.page("leads")  # login + 1
            clock.advance(10)
            await client.page("leads")  # 3rd request
            await client.page("leads")  # 4th: waits

    run(go())
    assert clock.slept == [290.0]
    assert len(api.gets()) == 3


def test_rolling_window_delay() -> None:
    """The window frees one slot for each event older than its length."""
    clock = FakeClock()
    window = RollingWindow(2, 300.0, clock)
    assert window.delay(0.0) == 0.0
    run(window.acquire())
    clock.advance(100)
    run(window.acquire())
    assert window.delay(clock.monotonic()) == 200.0
    assert window.delay(300.0) == 0.0


def test_logins_are_limited_per_window() -> None:
    """A server refusing every fresh token cannot drive more than 20 logins in five minutes."""
    api, clock = FakeApi(3), FakeClock()

    async def go() -> int:
        async with client_for(api, clock) as client:
            for _ in range(25):
                await client.login()
            return api.logins

    assert run(go()) == 25
    assert clock.slept == [300.0] and clock.monotonic() == 300.0


def test_in_flight_requests_are_bounded() -> None:
    """No more than max_in_flight requests are outstanding at once."""
    active = 0
    peak = 0
    api = FakeApi(3)

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return api(request)

    async def go() -> None:
        transport = httpx.MockTransport(handler)
        async with ConvertrClient(config(max_in_flight=2), clock=FakeClock(), transport=transport) as client:
            await asyncio.gather(*(client.page("leads") for _ in range(6)))

    run(go())
    assert peak == 2


def test_on_response_reports_endpoint_status_and_duration() -> None:
    """The metrics hook sees each exchange, with None for a status when no answer came."""
    api, clock = FakeApi(3), FakeClock()
    api.script = [httpx.ConnectError("refused")]
    seen: list[tuple[str, int | None, float]] = []

    async def go() -> None:
        transport = httpx.MockTransport(api)
        async with ConvertrClient(
            config(), clock=clock, transport=transport, on_response=lambda *a: seen.append(a)
        ) as c:
            await walk(c)
            assert c.request_count == 3

    run(go())
    assert [(e, s) for e, s, _ in seen] == [
        ("/api/login", 200),
        ("/api/v4/leads", None),
        ("/api/v4/leads", 200),
    ]


def test_pure_helpers() -> None:
    """View IRIs yield their page and templates their variables."""
    assert page_of("/api/v4/leads?createdTs%5Bafter%5D=x&itemsPerPage=100&page=12") == 12
    assert page_of("/api/v4/leads") is None and page_of(None) is None
    assert template_variables({"template": "/api/v4/campaigns{?status[],order[id]}"}) == {
        "status[]",
        "order[id]",
    }
    assert template_variables("nope") == frozenset()
    assert json.dumps(sorted(template_variables(SEARCH))) == '["campaign.id[]", "createdTs[after]", "id", "id[]"]'


# ---------------------------------------------------------------- against the simulator, over loopback

SIM_USER = "sim@acme.example"
SIM_PASSWORD = "sim-Pa55word-9"


def sim_config(url: str, **overrides: Any) -> ConvertrConfig:
    return ConvertrConfig(base_url=url, username=SIM_USER, password=SIM_PASSWORD, **overrides)


def lead_gets(sim: Simulator) -> list[tuple[str, int]]:
    return [(r.query, r.status) for r in sim.requests if r.path == "/api/v4/leads"]


def test_sim_walks_250_leads_in_three_pages() -> None:
    """250 leads at 100 a page arrive in three requests, each lead once, in id order."""
    clock = FakeClock()
    sim = Simulator(seed=11, username=SIM_USER, password=SIM_PASSWORD, clock=clock)
    created = sim.add_leads(250)

    async def go(url: str) -> list[Page]:
        async with ConvertrClient(sim_config(url), clock=clock) as client:
            return await walk(client)

    with SimulatorServer(sim, port=0) as server:
        pages = run(go(server.url))
    assert [len(p.members) for p in pages] == [100, 100, 50]
    assert [m["id"] for p in pages for m in p.members] == created
    assert pages[0].total == 250 and pages[0].last_page == 3
    assert {"createdTs[after]", "campaign.id[]"} <= pages[0].search_variables
    assert lead_gets(sim) == [(f"itemsPerPage=100&page={n}", 200) for n in (1, 2, 3)]
    assert all(r.auth_kind in ("header", "none") for r in sim.requests)


def test_sim_relogs_in_once_when_the_token_expires_mid_walk() -> None:
    """Tokens revoked between pages cost one 401 and one login, and the walk completes."""
    clock = FakeClock()
    sim = Simulator(seed=12, username=SIM_USER, password=SIM_PASSWORD, clock=clock)
    sim.add_leads(250)

    async def go(url: str) -> int:
        count = 0
        async with ConvertrClient(sim_config(url), clock=clock) as client:
            async for page in client.pages("leads"):
                count += len(page.members)
                if page.number == 1:
                    sim.expire_tokens()
        return count

    with SimulatorServer(sim, port=0) as server:
        assert run(go(server.url)) == 250
    assert sim.logins == 2
    # The page asked for ahead may be answered before or after the revocation: either way one 401.
    assert sorted(status for _, status in lead_gets(sim)) == [200, 200, 200, 401]


def test_sim_token_is_renewed_before_the_server_expires_it() -> None:
    """With a 120 s token lifetime the client logs in again at 110 s without ever meeting a 401."""
    clock = FakeClock()
    sim = Simulator(seed=13, username=SIM_USER, password=SIM_PASSWORD, token_lifetime=120, clock=clock)
    sim.add_leads(5)

    async def go(url: str) -> None:
        async with ConvertrClient(sim_config(url), clock=clock) as client:
            await client.page("leads")
            clock.advance(110)
            await client.page("leads")

    with SimulatorServer(sim, port=0) as server:
        run(go(server.url))
    assert sim.logins == 2
    assert all(r.status == 200 for r in sim.requests)


def test_sim_legacy_next_does_not_make_the_walk_loop() -> None:
    """A pre-2.5.5 server's endless `next` links are ignored: the walk ends at the last page or the first empty one."""
    clock = FakeClock()
    sim = Simulator(seed=14, username=SIM_USER, password=SIM_PASSWORD, clock=clock)
    sim.add_leads(250)
    sim.faults.legacy_next = True

    async def go(url: str) -> tuple[list[Page], list[Page]]:
        async with ConvertrClient(sim_config(url), clock=clock) as client:
            return await walk(client), await walk(client, start_page=4)

    with SimulatorServer(sim, port=0) as server:
        whole, beyond = run(go(server.url))
    assert [len(p.members) for p in whole] == [100, 100, 50]
    assert [(p.number, len(p.members)) for p in beyond] == [(4, 0)]
    assert len(lead_gets(sim)) == 4


def test_sim_filter_offsets_survive_the_trip() -> None:
    """`+01:00` reaches the server encoded, so a future bound filters everything and a past one nothing."""
    clock = FakeClock()
    sim = Simulator(seed=15, username=SIM_USER, password=SIM_PASSWORD, clock=clock)
    sim.add_leads(30)

    async def go(url: str, after: str) -> int:
        async with ConvertrClient(sim_config(url), clock=clock) as client:
            return sum([len(p.members) async for p in client.pages("leads", {"createdTs[after]": after})])

    with SimulatorServer(sim, port=0) as server:
        assert run(go(server.url, "2000-01-01T00:00:00+01:00")) == 30
        assert run(go(server.url, "2100-01-01T00:00:00+01:00")) == 0
    assert all("createdTs%5Bafter%5D=2100-01-01T00%3A00%3A00%2B01%3A00&" in q for q, _ in lead_gets(sim)[1:])


def test_sim_faults_are_ridden_out() -> None:
    """Injected 429s, 5xx answers and truncated bodies are retried until every lead has arrived."""
    clock = FakeClock()
    sim = Simulator(seed=16, username=SIM_USER, password=SIM_PASSWORD, clock=clock)
    created = sim.add_leads(250)
    sim.faults.rate_limit_429 = 1
    sim.faults.retry_after = 3
    sim.faults.error_rate = 0.2
    sim.faults.malformed_rate = 0.1

    async def go(url: str) -> list[int]:
        async with ConvertrClient(sim_config(url), clock=clock) as client:
            return [m["id"] for p in await walk(client) for m in p.members]

    with SimulatorServer(sim, port=0) as server:
        assert run(go(server.url)) == created
    assert clock.slept[0] == 3.0
    assert any(status >= 500 for _, status in lead_gets(sim))


# ---------------------------------------------------------------- refusals: Convertr's or a proxy's


def login_statuses(sim: Simulator) -> list[int]:
    return [r.status for r in sim.requests if r.path == "/api/login"]


def test_sim_login_behind_a_proxy_403_page_is_retried() -> None:
    """A 403 HTML page at login (a firewall or maintenance page) is retried with backoff, and the walk completes."""
    clock = FakeClock()
    sim = Simulator(seed=21, username=SIM_USER, password=SIM_PASSWORD, clock=clock)
    created = sim.add_leads(5)
    sim.faults.login_html_403 = 2

    async def go(url: str) -> list[int]:
        async with ConvertrClient(sim_config(url), clock=clock) as client:
            return [m["id"] for p in await walk(client) for m in p.members]

    with SimulatorServer(sim, port=0) as server:
        assert run(go(server.url)) == created
    assert login_statuses(sim) == [403, 403, 200] and sim.logins == 1
    assert len(clock.slept) == 2 and all(wait > 0 for wait in clock.slept)


def test_sim_a_proxy_page_that_stays_is_transient_never_an_auth_error() -> None:
    """An HTML 403 at every login, or on every read, ends in a one-line TransientError, never AuthError or ApiError."""
    clock = FakeClock()
    sim = Simulator(seed=22, username=SIM_USER, password=SIM_PASSWORD, clock=clock)
    sim.add_leads(5)
    sim.faults.login_html_403 = 1000

    async def go(url: str, *, then_proxy: bool = False) -> None:
        async with ConvertrClient(sim_config(url), clock=clock) as client:
            await client.login()
            if then_proxy:
                sim.faults.proxy_403_rate = 1.0
            await walk(client)

    with SimulatorServer(sim, port=0) as server:
        with pytest.raises(TransientError) as at_login:
            run(go(server.url))
        assert len(login_statuses(sim)) == RETRY_ATTEMPTS
        sim.faults.login_html_403 = 0
        with pytest.raises(TransientError) as at_read:
            run(go(server.url, then_proxy=True))
        assert [status for _, status in lead_gets(sim)] == [403] * RETRY_ATTEMPTS
    for caught in (at_login, at_read):
        text = str(caught.value)
        assert not isinstance(caught.value, AuthError) and caught.value.status == 403
        assert "403 with a text/html body that is not Convertr's OAuth answer" in text
        assert "\n" not in text and "<" not in text and SIM_PASSWORD not in text
    assert str(at_login.value).startswith("Convertr POST /api/login: 403")
    assert str(at_read.value).startswith("Convertr GET /api/v4/leads: 403")


def test_sim_oauth_refusals_stay_fatal() -> None:
    """Convertr's own invalid_grant and an expired password are AuthError at once, with no retry."""
    clock = FakeClock()
    sim = Simulator(seed=23, username=SIM_USER, password=SIM_PASSWORD, clock=clock)
    sim.add_leads(3)

    async def go(url: str, password: str) -> None:
        cfg = ConvertrConfig(base_url=url, username=SIM_USER, password=password)
        async with ConvertrClient(cfg, clock=clock) as client:
            await walk(client)

    with SimulatorServer(sim, port=0) as server:
        with pytest.raises(AuthError, match=f"refused the login for {SIM_USER}: invalid_grant"):
            run(go(server.url, "wrong-Pa55word"))
        assert login_statuses(sim) == [400] and clock.slept == []
        sim.password_expired = True
        with pytest.raises(AuthError, match="has expired: change it in Convertr"):
            run(go(server.url, SIM_PASSWORD))
    assert clock.slept == []


def test_sim_401_after_a_fresh_login_is_transient_unless_the_credentials_expired() -> None:
    """A fresh token refused (invalid_grant or a proxy's 401 page) is retried; "Credentials have expired" is fatal."""
    clock = FakeClock()
    sim = Simulator(seed=24, username=SIM_USER, password=SIM_PASSWORD, clock=clock)
    created = sim.add_leads(5)

    async def go(url: str) -> list[int]:
        async with ConvertrClient(sim_config(url), clock=clock) as client:
            await client.login()
            return [m["id"] for p in await walk(client) for m in p.members]

    with SimulatorServer(sim, port=0) as server:
        sim.faults.token_rejections = 2
        assert run(go(server.url)) == created
        assert [status for _, status in lead_gets(sim)] == [401, 401, 200]
        sim.faults.html_401 = 2
        assert run(go(server.url)) == created
        assert [status for _, status in lead_gets(sim)][3:] == [401, 401, 200]

        async def expire_then_read(url: str) -> None:
            async with ConvertrClient(sim_config(url), clock=clock) as client:
                await client.login()
                sim.password_expired = True
                await walk(client)

        with pytest.raises(AuthError, match="has expired"):
            run(expire_then_read(server.url))


_SIM_PROCESS = """
import sys
from watcher.simulator import Simulator, SimulatorServer
sim = Simulator(seed=17, username=sys.argv[1], password=sys.argv[2])
sim.add_leads(int(sys.argv[3]))
with SimulatorServer(sim, port=0) as server:
    print(server.url, flush=True)
    sys.stdin.read()
"""


def test_memory_does_not_grow_with_pages_walked() -> None:
    """The peak while walking 300 pages stays near the peak for 30: the client holds one page at a time."""
    per_page, pages = 20, 300
    # The server runs in its own process so that tracemalloc sees only the client's allocations.
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIM_PROCESS, SIM_USER, SIM_PASSWORD, str(per_page * pages)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")

        async def peak(limit: int) -> tuple[int, int]:
            async with ConvertrClient(sim_config(url, items_per_page=per_page), clock=FakeClock()) as client:
                await client.login()
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    walked = 0
                    async for _page in client.pages("leads"):
                        walked += 1
                        if walked == limit:
                            break
                    return walked, tracemalloc.get_traced_memory()[1] - base
                finally:
                    tracemalloc.stop()

        short, short_peak = run(peak(30))
        long, long_peak = run(peak(pages))
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    assert (short, long) == (30, 300)
    assert long_peak < 2 * short_peak, (short_peak, long_peak)
