"""The async Convertr API v4 client: login, paged collection reads, retries and the request budget.

Every httpx failure is translated here into the `watcher.errors` tree, so nothing above this
module sees httpx exceptions. Error texts carry the status, the path (never the query string,
which may hold filter values) and a short reason from the body; never a token or the password.
Bodies are streamed and inflated in bounded steps: an answer that would pass `max_response_bytes`
once decoded is a ResponseTooLarge, never read to the end.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_exponential_jitter,
)

from watcher import __version__
from watcher.bodies import Answer, BodyError, BodyTooLarge, read_body, without_entity_headers
from watcher.clock import Clock, SystemClock
from watcher.config import ConvertrConfig
from watcher.errors import (
    ApiError,
    AuthError,
    ConfigError,
    MalformedResponse,
    NotFound,
    RateLimited,
    ResponseTooLarge,
    ServerFault,
    TransientError,
)
from watcher.events import loads
from watcher.schedule import retry_after_seconds
from watcher.tls import client_context
from watcher.unreachable import TIMED_OUT, describe

log = structlog.get_logger(__name__)
T = TypeVar("T")

PREFETCH_TURNS = 5
LOGIN_PATH = "/api/login"
COLLECTION_PREFIX = "/api/v4/"

WINDOW_SECONDS = 300.0
# Past this share of the request budget, requests are spaced at its average rate (budget / 5 min).
PACE_AFTER = 0.5
PACE_MIN_BUDGET = 100
LOGINS_PER_WINDOW = 20  # Convertr allows 100; a healthy daemon needs about one an hour
RETRY_ATTEMPTS = 5
RETRY_TOTAL_SECONDS = 120.0
# The longest the client sleeps on Convertr's Retry-After before trying a request again: a walk is
# never held longer than this by one answer (and RETRY_TOTAL_SECONDS bounds all the tries).
RETRY_AFTER_CAP = 60.0
BACKOFF = wait_exponential_jitter(multiplier=0.5, max=30.0, jitter=0.5)

# Status codes that may pass by themselves. 500 is included on purpose: API Platform masks every
# unhandled exception as a bare 500 (deadlocks, lost DB connections, upstream timeouts look the
# same), and every request we retry is an idempotent read or a login that only mints a new token,
# so one more try is safe and the attempt cap keeps a persistent 500 from looping.
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})

# The error codes of RFC 6749 (section 5.2, plus access_denied, which Convertr's OAuth server
# answers for a user whose credentials have expired). Only a JSON body carrying one of these is
# Convertr itself refusing us; a 400/401/403 with anything else (an HTML page from a proxy,
# firewall or maintenance window) says nothing about the credentials and is retried.
OAUTH_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
    }
)
REFUSAL_STATUSES = frozenset({400, 401, 403})

_COLLECTION_NAME = re.compile(r"[a-z][a-z0-9-]*")
_ITEM_ID = re.compile(r"/\d+$")
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9.+-]{1,40}/[A-Za-z0-9.+-]{1,60}")
_RESERVED_PARAMS = frozenset({"page", "itemsPerPage", "access_token"})


@dataclass(frozen=True)
class Page:
    """One page of a collection as the server sent it."""

    number: int
    members: list[dict[str, Any]]
    total: int | None
    last_page: int | None
    server_date: datetime | None
    search_variables: frozenset[str]
    has_view: bool = False  # the collection carried a hydra:view (paging links)


# ---------------------------------------------------------------- pure helpers


def parse_http_date(value: str | None) -> datetime | None:
    """An HTTP Date header as an aware UTC datetime, or None when absent or unreadable."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def page_of(iri: object) -> int | None:
    """The `page` query parameter of a hydra view IRI."""
    if not isinstance(iri, str):
        return None
    values = parse_qs(urlsplit(iri).query).get("page")
    if not values:
        return None
    try:
        return int(values[-1])
    except ValueError:
        return None


def template_variables(search: object) -> frozenset[str]:
    """The variable names of a hydra:search IRI template such as `/api/v4/leads{?id,id[]}`."""
    if not isinstance(search, dict):
        return frozenset()
    template = search.get("hydra:template", search.get("template"))
    if not isinstance(template, str):
        return frozenset()
    match = re.search(r"\{\?([^}]*)\}", template)
    if not match:
        return frozenset()
    return frozenset(name.strip() for name in match.group(1).split(",") if name.strip())


def _pick(body: Mapping[str, Any], name: str) -> Any:
    """A Hydra key, prefixed or not (API Platform 4 may drop the `hydra:` prefix)."""
    prefixed = f"hydra:{name}"
    return body[prefixed] if prefixed in body else body.get(name)


def parse_collection(
    body: object, number: int, items_per_page: int, server_date: datetime | None, endpoint: str
) -> tuple[Page, bool]:
    """A collection document as a `Page`, plus whether it carried a view; raises MalformedResponse."""
    if not isinstance(body, dict):
        raise MalformedResponse(f"Convertr GET {endpoint}: the body is not a JSON object", status=200)
    members = _pick(body, "member")
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise MalformedResponse(f"Convertr GET {endpoint}: no member list in the collection", status=200)
    raw_total = _pick(body, "totalItems")
    total = raw_total if isinstance(raw_total, int) and not isinstance(raw_total, bool) else None
    view = _pick(body, "view")
    has_view = isinstance(view, dict)
    last_page = page_of(_pick(view, "last")) if isinstance(view, dict) else None
    if last_page is None and total is not None and items_per_page > 0:
        last_page = max(1, math.ceil(total / items_per_page))
    page = Page(
        number=number,
        members=members,
        total=total,
        last_page=last_page,
        server_date=server_date,
        search_variables=template_variables(_pick(body, "search")),
        has_view=has_view,
    )
    return page, has_view


def is_last(page: Page, has_view: bool, items_per_page: int) -> bool:
    """Whether a walk ends after this page; `hydra:next` is ignored because old servers emit it forever."""
    if not page.members:
        return True
    if page.last_page is not None and page.number >= page.last_page:
        return True
    return not has_view and len(page.members) < items_per_page


def query_pairs(params: Mapping[str, str | Sequence[str]] | None) -> list[tuple[str, str]]:
    """Filter params as ordered pairs, a list value becoming repeated keys (`campaign.id[]`)."""
    pairs: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        if key in _RESERVED_PARAMS:
            raise ValueError(f"{key} is set by the client, not by the caller")
        if isinstance(value, str):
            pairs.append((key, value))
        else:
            pairs.extend((key, str(item)) for item in value)
    return pairs


def body_reason(response: Answer, secrets: Sequence[str]) -> str:
    """A one-line reason from an error body (`hydra:description`, `error`, ...), secrets masked."""
    reason = ""
    body = _json_or_none(response)
    if isinstance(body, dict):
        parts = [
            body[key]
            for key in ("hydra:description", "description", "detail", "error", "error_description")
            if isinstance(body.get(key), str) and body[key]
        ]
        reason = ": ".join(dict.fromkeys(parts))
    if not reason:
        reason = response.reason_phrase or ""
    for secret in secrets:
        if secret:
            reason = reason.replace(secret, "***")
    return " ".join(reason.split())[:200]


def oauth_error(body: object) -> str | None:
    """The OAuth2 error code of an error body, or None when the body is not an OAuth error document."""
    if not isinstance(body, dict):
        return None
    code = body.get("error")
    return code if isinstance(code, str) and code in OAUTH_ERRORS else None


def credentials_expired(body: object) -> bool:
    """Whether an error body is the OAuth server saying the user's credentials (password) expired."""
    if oauth_error(body) != "access_denied" or not isinstance(body, dict):
        return False
    description = body.get("error_description")
    return isinstance(description, str) and "expired" in description.lower()


def not_convertr(response: Answer) -> str:
    """How to describe an answer that is not Convertr's own (its media type only: the body may be anything)."""
    raw = response.headers.get("Content-Type", "").partition(";")[0].strip()
    kind = f"a {raw} body" if _MEDIA_TYPE.fullmatch(raw) else "a body"
    return f"{kind} that is not Convertr's OAuth answer (a proxy, firewall or maintenance page?)"


class RollingWindow:
    """At most `limit` events in any `window` seconds of the injected monotonic clock.

    With `pace_after`, once that share of the limit is used the events are spaced at the
    window's average rate (window / limit), so a demand above the limit slows down evenly
    instead of filling the window in a burst and then stalling until its oldest event leaves.
    `on_wait` hears of every wait before it is slept (seconds), so a throttled daemon is seen.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        clock: Clock,
        on_wait: Callable[[float], None] | None = None,
        pace_after: float | None = None,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._times: deque[float] = deque()
        self._on_wait = on_wait
        self._pace_after = pace_after

    def used(self) -> int:
        """Events in the window ending now."""
        self.delay(self._clock.monotonic())
        return len(self._times)

    def delay(self, now: float) -> float:
        """Seconds until one more event fits (0 when it fits now)."""
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        wait = 0.0 if len(self._times) < self.limit else self._times[0] + self.window - now
        if self._pace_after is not None and self._times and len(self._times) >= self.limit * self._pace_after:
            wait = max(wait, self._times[-1] + self.window / self.limit - now)
        return max(0.0, wait)

    async def acquire(self) -> None:
        """Take a slot, sleeping through the clock until one frees."""
        while True:
            now = self._clock.monotonic()
            wait = self.delay(now)
            if wait <= 0:
                self._times.append(now)
                return
            if self._on_wait is not None:
                self._on_wait(wait)
            await self._clock.sleep(wait)


# ---------------------------------------------------------------- the client


class ConvertrClient:
    """One long-lived HTTP client for one Convertr enterprise; use as an async context manager."""

    def __init__(
        self,
        config: ConvertrConfig,
        *,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_response: Callable[[str, int | None, float], None] | None = None,
        on_budget_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._config = config
        self._on_budget_wait = on_budget_wait
        self._clock: Clock = clock or SystemClock()
        self._on_response = on_response
        # Without an injected transport (tests pass a MockTransport) httpx builds its own
        # AsyncHTTPTransport: no retries (a failed read is ours to retry, with backoff and the
        # budget), Happy Eyeballs through anyio, and proxies from the environment, which httpx
        # reads only for a client whose transport it builds itself.
        try:
            self._http = self._client(config, transport)
        except ImportError:
            # httpx builds a SOCKS transport for a socks:// proxy only with its [socks] extra. The
            # proxy URL is not quoted: it may carry credentials.
            raise ConfigError(
                "",
                "the environment names a SOCKS proxy (ALL_PROXY, HTTPS_PROXY or HTTP_PROXY), which the "
                "Convertr client needs httpx's [socks] extra for: pip install 'httpx[socks]', or unset it",
            ) from None
        self._token: str | None = None
        self._refresh_at = 0.0  # monotonic time after which the token is renewed before use
        self._login_lock = asyncio.Lock()
        self._in_flight = asyncio.Semaphore(max(1, config.max_in_flight))
        # A budget too small to pace (a test's) is only ever a hard limit.
        pace = PACE_AFTER if config.request_budget >= PACE_MIN_BUDGET else None
        self._budget = RollingWindow(config.request_budget, WINDOW_SECONDS, self._clock, self._budget_wait, pace)
        # (monotonic time it ended, seconds) of each budget wait: a stretch of throttling lasts
        # until a whole window passes without one.
        self._waits: deque[tuple[float, float]] = deque()
        self._warned_throttled = False
        self._login_budget = RollingWindow(LOGINS_PER_WINDOW, WINDOW_SECONDS, self._clock)
        self.request_count = 0

    @staticmethod
    def _client(config: ConvertrConfig, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"),
            transport=transport,
            verify=client_context(),
            timeout=httpx.Timeout(config.timeout),
            follow_redirects=False,
            headers={
                "Accept": "application/ld+json",
                # Only what bodies.read_body inflates in bounded steps.
                "Accept-Encoding": "gzip, deflate",
                "User-Agent": f"convertr-watcher/{__version__}",
            },
        )

    async def __aenter__(self) -> ConvertrClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    # -- the request budget

    def budget_used(self) -> int:
        """Requests made in the rolling window ending now."""
        return self._budget.used()

    def _budget_wait(self, seconds: float) -> None:
        now = self._clock.monotonic()
        self._forget_waits(now)
        if not self._waits and not self._warned_throttled:
            # Once per stretch of throttling: every request of a throttled walk waits.
            self._warned_throttled = True
            log.warning(
                "convertr.throttled: the request budget is spent, requests wait for the rolling window",
                request_budget=self._config.request_budget,
                window_s=WINDOW_SECONDS,
                wait_s=round(seconds, 1),
            )
        self._waits.append((now + seconds, seconds))
        if self._on_budget_wait is not None:
            self._on_budget_wait(seconds)

    def _forget_waits(self, now: float) -> None:
        while self._waits and self._waits[0][0] <= now - WINDOW_SECONDS:
            self._waits.popleft()
        if not self._waits:
            self._warned_throttled = False

    def throttled_note(self) -> str | None:
        """For `status`: how long requests waited for the budget in the last window, or None."""
        self._forget_waits(self._clock.monotonic())
        if not self._waits:
            return None
        waited = sum(seconds for _, seconds in self._waits)
        return (
            f"throttled: requests waited {waited:.0f} s for the request budget in the last "
            f"{WINDOW_SECONDS / 60:g} min (request_budget {self._config.request_budget})"
        )

    # -- public reads

    async def login(self) -> None:
        """Log in now (with retries on transient failures); raises AuthError when refused."""
        await self._retrying(self._login_shared, None)

    async def pages(
        self,
        collection: str,
        params: Mapping[str, str | Sequence[str]] | None = None,
        *,
        start_page: int = 1,
    ) -> AsyncGenerator[Page, None]:
        """Walk a collection page by page, holding at most the page in hand and the next one."""
        pairs = query_pairs(params)
        size = self._config.items_per_page
        number = max(1, start_page)
        page, has_view = await self._fetch(collection, pairs, number, size)
        while not is_last(page, has_view, size):
            # Ask for the next page before handing this one over: Convertr prepares it while the
            # caller detects and commits, so a walk costs about the larger of the two, not the sum.
            ahead = asyncio.create_task(self._fetch(collection, pairs, number + 1, size))
            ahead.add_done_callback(_consume)
            try:
                await let_requests_start()
                yield page
                page, has_view = await ahead
            finally:
                ahead.cancel()  # the caller stopped early: the page asked for ahead is not wanted
            number += 1
        yield page

    async def page(
        self,
        collection: str,
        params: Mapping[str, str | Sequence[str]] | None = None,
        *,
        number: int = 1,
        items_per_page: int | None = None,
        attempts: int = RETRY_ATTEMPTS,
    ) -> Page:
        """One page by number, one request: page 1 with `items_per_page=1` reads hydra:search or the
        newest id; a walk checks its position, or narrows in on an unreadable record (with fewer
        `attempts` where a failure only means "look closer")."""
        size = self._config.items_per_page if items_per_page is None else items_per_page
        page, _ = await self._fetch(collection, query_pairs(params), max(1, number), size, attempts)
        return page

    async def item(self, collection: str, item_id: int, *, attempts: int = RETRY_ATTEMPTS) -> dict[str, Any] | None:
        """One document by id; None when the server has none visible under that id (404)."""
        if not _COLLECTION_NAME.fullmatch(collection):
            raise ValueError(f"not a collection name: {collection!r}")
        path = f"{COLLECTION_PREFIX}{collection}/{int(item_id)}"
        endpoint = f"{COLLECTION_PREFIX}{collection}/{{id}}"

        async def attempt() -> dict[str, Any]:
            response = await self._authed_get(path, [])
            body = self._json(response, "GET", endpoint)
            if not isinstance(body, dict):
                raise MalformedResponse(f"Convertr GET {endpoint}: the body is not a JSON object", status=200)
            return body

        try:
            return await self._retrying(attempt, endpoint, attempts)
        except NotFound:
            return None

    # -- paging

    async def _fetch(
        self, collection: str, pairs: list[tuple[str, str]], number: int, size: int, attempts: int = RETRY_ATTEMPTS
    ) -> tuple[Page, bool]:
        if not _COLLECTION_NAME.fullmatch(collection):
            raise ValueError(f"not a collection name: {collection!r}")
        path = f"{COLLECTION_PREFIX}{collection}"
        query = [*pairs, ("itemsPerPage", str(size)), ("page", str(number))]

        async def attempt() -> tuple[Page, bool]:
            response = await self._authed_get(path, query)
            body = self._json(response, "GET", path)
            return parse_collection(body, number, size, parse_http_date(response.headers.get("Date")), path)

        return await self._retrying(attempt, path, attempts)

    # -- retries

    async def _retrying(
        self, attempt: Callable[[], Awaitable[T]], path: str | None, attempts: int = RETRY_ATTEMPTS
    ) -> T:
        started = self._clock.monotonic()

        # Stop before a sleep would cross the total bound: waiting only to give up helps nobody.
        def stop(state: RetryCallState) -> bool:
            elapsed = self._clock.monotonic() - started
            return state.attempt_number >= attempts or elapsed + state.upcoming_sleep > RETRY_TOTAL_SECONDS

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            # The server said when its window reopens; jitter only matters for our own guesses.
            if isinstance(error, TransientError) and error.retry_after is not None:
                return min(max(error.retry_after, 0.0), RETRY_AFTER_CAP)
            return float(BACKOFF(state))

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.debug(
                "convertr.retry",
                endpoint=path or LOGIN_PATH,
                attempt=state.attempt_number,
                wait=round(state.upcoming_sleep, 3),
                error=str(error),
            )

        retrying = AsyncRetrying(
            sleep=self._clock.sleep,
            stop=stop,
            wait=wait,
            # The same request is as large the next time: a walk splits the page instead.
            retry=retry_if_exception_type(TransientError) & retry_if_not_exception_type(ResponseTooLarge),
            before_sleep=before_sleep,
            reraise=True,
        )
        result: T = await retrying(attempt)
        return result

    # -- authentication

    async def _login_shared(self) -> None:
        async with self._login_lock:
            await self._login_once()

    async def _token_for_request(self) -> str:
        token = self._token
        if token is not None and self._clock.monotonic() < self._refresh_at:
            return token
        # Concurrent callers queue on the lock and find the token the first one fetched.
        async with self._login_lock:
            if self._token is None or self._clock.monotonic() >= self._refresh_at:
                await self._login_once()
            return self._current_token()

    async def _token_after_401(self, rejected: str) -> str:
        async with self._login_lock:
            if self._token is None or self._token == rejected:
                self._token = None
                await self._login_once()
            return self._current_token()

    def _current_token(self) -> str:
        if self._token is None:  # _login_once either sets it or raises
            raise AuthError("Convertr login produced no token")
        return self._token

    async def _login_once(self) -> None:
        username = self._config.username
        await self._login_budget.acquire()
        sent_at = self._clock.monotonic()
        response = await self._send("POST", LOGIN_PATH, data={"username": username, "password": self._config.password})
        body = _json_or_none(response)
        status = response.status_code
        if isinstance(body, dict) and (body.get("mfa_token") or str(body.get("error", "")).lower() == "mfa required"):
            raise AuthError(
                f"Convertr asks for multi-factor authentication for {username}, which the watcher cannot "
                "answer: use an API user without MFA",
                status=status,
            )
        if status in REFUSAL_STATUSES:
            code = oauth_error(body)
            if code is None:
                # Something in front of Convertr answered: it knows nothing of our credentials, and
                # exiting 78 here would keep the service down long after the page went away.
                what = not_convertr(response)
                raise TransientError(f"Convertr POST {LOGIN_PATH}: {status} with {what}", status=status)
            if credentials_expired(body):
                raise AuthError(self._expired_message(), status=status)
            raise AuthError(f"Convertr refused the login for {username}: {code}", status=status)
        self._raise_for_status(response, "POST", LOGIN_PATH)
        if not isinstance(body, dict):
            raise MalformedResponse(f"Convertr POST {LOGIN_PATH}: the body is not a JSON object", status=status)
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise MalformedResponse(f"Convertr POST {LOGIN_PATH}: no access_token in the answer", status=status)
        if body.get("password_expired") is True:
            raise AuthError(self._expired_message(), status=status)
        raw_lifetime = body.get("expires_in")
        lifetime = (
            float(raw_lifetime)
            if isinstance(raw_lifetime, int | float) and not isinstance(raw_lifetime, bool) and raw_lifetime > 0
            else 3600.0
        )
        self._token = token
        # Renew a little early so a token never expires between our check and the server's.
        self._refresh_at = sent_at + lifetime - min(60.0, 0.1 * lifetime)
        log.debug("convertr.logged_in", expires_in=lifetime)

    def _expired_message(self) -> str:
        return (
            f"The Convertr password of {self._config.username} has expired: change it in Convertr, "
            "then update the watcher's convertr password setting"
        )

    # -- one HTTP exchange

    async def _authed_get(self, path: str, query: list[tuple[str, str]]) -> Answer:
        token = await self._token_for_request()
        response = await self._send("GET", path, params=query, token=token)
        if response.status_code == 401:
            token = await self._token_after_401(token)
            response = await self._send("GET", path, params=query, token=token)
            if response.status_code == 401:
                reason = body_reason(response, self._secrets())
                message = f"Convertr GET {path}: 401 even with a fresh token ({reason})"
                if credentials_expired(_json_or_none(response)):
                    raise AuthError(f"{message}: {self._expired_message()}", status=401)
                # The login just succeeded, so the credentials are good: a token store lagging
                # behind the login, or a proxy's page. Retried with backoff; never fatal.
                raise TransientError(message, status=401)
        self._raise_for_status(response, "GET", path)
        return response

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        data: dict[str, str] | None = None,
        token: str | None = None,
    ) -> Answer:
        await self._budget.acquire()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        async with self._in_flight:
            self.request_count += 1
            started = self._clock.monotonic()
            status: int | None = None
            try:
                # httpx timeouts are per socket operation; this bounds the whole exchange.
                async with asyncio.timeout(self._config.timeout):
                    request = self._http.build_request(
                        method, path, params=tuple(params) if params else None, data=data, headers=headers
                    )
                    streamed = await self._http.send(request, stream=True)
                    try:
                        status = streamed.status_code
                        body = await read_body(streamed, self._config.max_response_bytes)
                    finally:
                        await streamed.aclose()
                response = Answer(status, without_entity_headers(streamed.headers), body)
            except BodyTooLarge as exc:
                raise ResponseTooLarge(
                    f"Convertr {method} {path}: {status} answer larger than {exc.limit} bytes once decoded "
                    "([convertr] max_response_bytes); not read further",
                    status=status,
                ) from None
            except BodyError as exc:
                raise MalformedResponse(
                    f"Convertr {method} {path}: {status} with an unreadable body ({exc})", status=status
                ) from None
            except (TimeoutError, httpx.TimeoutException) as exc:
                raise TransientError(f"Convertr {method} {path}: {TIMED_OUT}") from exc
            except httpx.UnsupportedProtocol as exc:
                raise ApiError(f"Convertr {method} {path}: unsupported URL scheme in base_url") from exc
            except httpx.RemoteProtocolError as exc:
                raise TransientError(f"Convertr {method} {path}: the answer is not valid HTTP") from exc
            except httpx.RequestError as exc:
                raise TransientError(f"Convertr {method} {path}: {describe(exc, type(exc).__name__)}") from exc
            finally:
                if self._on_response is not None:
                    # Item reads are counted under their template: a lead id is no metric label.
                    self._on_response(_ITEM_ID.sub("/{id}", path), status, self._clock.monotonic() - started)
        log.debug("convertr.response", method=method, endpoint=path, status=status)
        return response

    def _raise_for_status(self, response: Answer, method: str, path: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        reason = body_reason(response, self._secrets())
        message = f"Convertr {method} {path}: {status} {reason}".rstrip()
        retry_after = retry_after_seconds(response.headers.get("Retry-After"), self._clock.now(), RETRY_AFTER_CAP)
        if status == 429:
            raise RateLimited(message, status=status, retry_after=retry_after)
        if status == 500:
            raise ServerFault(message, status=status, retry_after=retry_after)
        if status in TRANSIENT_STATUSES:
            raise TransientError(message, status=status, retry_after=retry_after)
        if status in REFUSAL_STATUSES and not isinstance(_json_or_none(response), dict):
            # API Platform answers its refusals in JSON; a page without one came from something
            # in front of it (a firewall or maintenance page), which passes by itself.
            raise TransientError(f"Convertr {method} {path}: {status} with {not_convertr(response)}", status=status)
        if status == 404:
            raise NotFound(message, status=status)
        raise ApiError(message, status=status)

    def _json(self, response: Answer, method: str, path: str) -> Any:
        try:
            return loads(response.content)  # orjson.JSONDecodeError is a ValueError
        except ValueError as exc:
            raise MalformedResponse(
                f"Convertr {method} {path}: {response.status_code} with a body that is not JSON",
                status=response.status_code,
            ) from exc

    def _secrets(self) -> list[str]:
        return [s for s in (self._token, self._config.password) if s]


def _json_or_none(response: Answer) -> Any:
    try:
        return loads(response.content)
    except ValueError:
        return None


async def let_requests_start() -> None:
    """Give requests just made as tasks the loop turns they need to get on the wire.

    httpx's transport takes a few turns to write a request (the pool, then the connection), a new
    connection more. A caller that goes on to detect
    and commit a page without yielding would hold a read-ahead back until it is done, and the walk
    would cost the sum of Convertr's time and ours, not the larger.
    """
    for _ in range(PREFETCH_TURNS):
        await asyncio.sleep(0)


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve a prefetch's outcome so an abandoned one never warns "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()
