"""What every sink shares: the Sink protocol, the attempt record, and the HTTP plumbing of HTTP sinks.

A sink turns one attempt into either an `Attempt` (the receiver has the events) or one of the
delivery errors (`DeliveryError`, `Throttled`, `SinkGone`); the dispatcher decides what happens
next. HTTP sinks POST through aiohttp, one `ClientSession` per sink: kept connections up to the
sink's concurrency, Happy Eyeballs, the process's TLS context, proxies from the environment.
aiohttp's errors are translated here, at the boundary, into `DeliveryError`s whose texts name
the cause (watcher.unreachable) and never the URL: sink URLs may themselves be secrets (Slack
hooks are), so nothing here puts a URL, or anything derived from one, into a message or an excerpt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp
import httpx
import yarl
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.helpers import get_env_proxy_for_url
from aiohttp.tracing import Trace

from watcher.bodies import Answer, BodyError, Decoding, content_encoding, without_entity_headers
from watcher.clock import Clock
from watcher.config import SinkConfig
from watcher.errors import DeliveryError
from watcher.events import Event
from watcher.pii import strip_pii
from watcher.schedule import retry_after_seconds
from watcher.tls import client_context
from watcher.unreachable import REFUSED, causes, describe

EXCERPT_LIMIT = 512
# The most of a receiver's answer ever read (decoded): enough for the excerpt's characters in
# UTF-8. The rest is never read, so a huge or compressed answer costs nothing.
EXCERPT_BYTES = 4 * EXCERPT_LIMIT
# A refused connection right after a receiver restart often succeeds a moment later; anything
# longer than this blip is the dispatcher's job, on the sink's schedule. Nothing was sent.
CONNECT_RETRY_WAIT = 0.2
# The longest wait a receiver's Retry-After is passed on as; the dispatcher clamps it further
# against the sink's schedule (see schedule.next_attempt_at).
RECEIVER_RETRY_AFTER_CAP = 86_400.0
# How long a kept connection may sit unused before it is closed rather than reused: below the 5 s
# idle timeout of Node's and many other servers, so a POST seldom meets a connection the receiver
# is closing at that moment (such a POST fails, and is not sent again: see README "Connections").
KEEPALIVE_EXPIRY = 4.0
# RFC 8305's recommended Connection Attempt Delay: the next address (the other family) is tried
# this long after one that has not answered yet.
HAPPY_EYEBALLS_DELAY = 0.25
MAX_HEADER_LINE = 64 * 1024
# How many header lines an answer may carry (aiohttp's default is 128): a receiver behind proxies
# adding cookies, policies and tracing can pass that, and its 2xx refused as invalid HTTP would
# have the event sent again until it died. h11, before aiohttp, bounded only the head's size.
MAX_HEADER_LINES = 1024
NO_ANSWER = "the receiver closed the connection without a complete answer"


# The watcher's own record of campaign names by id, as last read (Store.campaign_names in the daemon).
CampaignNames = Callable[[], Mapping[int, str]]


@dataclass(frozen=True)
class Attempt:
    """What one successful delivery attempt looked like. The attempt log keeps its status and the
    start of its answer (delivery.policy.attempt_excerpt); a failed attempt's answer rides on its
    DeliveryError.excerpt instead."""

    status: int | None
    duration: float
    # At most EXCERPT_LIMIT characters, with the sink URL redacted. Read longer than anyone shows it
    # (send-test and the attempt log, delivery.policy.ATTEMPT_EXCERPT_CHARS), so masking comes before the cut.
    response_excerpt: str


class Sink(Protocol):
    name: str
    config: SinkConfig
    max_batch: int  # events per deliver() call: 1 for webhooks, more for a Slack digest
    min_interval: float  # seconds to leave between two sends to this sink

    async def deliver(self, events: Sequence[Event]) -> Attempt:
        """Send the events once; raise DeliveryError, Throttled or SinkGone on failure."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Reachable(Protocol):
    """A sink that can check its receiver is there without sending an event (`check --connect`)."""

    async def reach(self) -> str:
        """What was reached, in words without secrets; raise DeliveryError naming why not."""
        ...


def render_data(event: Event, config: SinkConfig) -> Mapping[str, Any]:
    """The `data` this sink may see: personal fields removed unless `include_pii`."""
    return event.data if config.include_pii else strip_pii(event.data)


def asked_wait(response: Answer, now: float) -> float | None:
    """The seconds from `now` a receiver's Retry-After asks for, at most RECEIVER_RETRY_AFTER_CAP."""
    return retry_after_seconds(response.headers.get("retry-after"), now, RECEIVER_RETRY_AFTER_CAP)


def excerpt(text: str, secret_url: str, limit: int = EXCERPT_LIMIT) -> str:
    """A response body fit for the attempt log: the URL and its parts redacted, at most `limit` chars."""
    if not text:
        return ""  # the usual answer (204, or 200 with no body): nothing to parse the URL for
    needles = [secret_url]
    try:
        url = httpx.URL(secret_url)
        needles += [url.raw_path.decode("ascii", "replace"), url.path, url.query.decode("ascii", "replace")]
    except httpx.InvalidURL:
        pass
    redacted = text
    # Longest first, so the full URL is replaced before its parts; "/" alone is not worth hiding.
    for needle in sorted({n for n in needles if len(n) > 1}, key=len, reverse=True):
        redacted = redacted.replace(needle, "[redacted]")
    return redacted if len(redacted) <= limit else redacted[: limit - 1] + "…"


def _seconds(value: float) -> str:
    return f"{value:g}s"


def failure(exc: BaseException, timeout: float) -> DeliveryError:
    """The DeliveryError for an aiohttp failure: what went wrong, never the URL (aiohttp's own texts
    name the host)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return DeliveryError(f"timed out connecting after {_seconds(timeout)}")
    if isinstance(exc, TimeoutError):
        return DeliveryError(f"timed out after {_seconds(timeout)}")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return DeliveryError(f"the proxy refused the connection (HTTP {exc.status})")
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return DeliveryError(f"cannot reach the proxy: {describe(exc, 'connection failed')}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return DeliveryError(describe(exc, "connection failed"))
    if isinstance(exc, UnicodeError):  # a host label IDNA cannot encode (longer than 63 characters)
        return DeliveryError("host name is not valid")
    if isinstance(exc, aiohttp.InvalidURL):
        return DeliveryError("sink URL is not a valid http(s) URL")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return DeliveryError(NO_ANSWER)
    if any(type(cause) is aiohttp.ClientConnectionResetError for cause in causes(exc)):
        return DeliveryError("the receiver closed the connection before the request was sent")
    if isinstance(exc, aiohttp.ClientOSError):
        return DeliveryError(describe(exc, NO_ANSWER))
    if isinstance(exc, aiohttp.ClientResponseError):
        return DeliveryError("the receiver's answer is not valid HTTP")
    # yarl refusing a host, or a header value aiohttp will not write (ssl's errors are ValueErrors too).
    if isinstance(exc, ValueError) and not isinstance(exc, OSError):
        return DeliveryError("the request could not be written (an invalid URL or header value)")
    return DeliveryError(describe(exc, f"connection failed ({type(exc).__name__})"))


def env_proxy(url: str) -> tuple[yarl.URL | None, aiohttp.BasicAuth | None]:
    """The proxy HTTP_PROXY / HTTPS_PROXY / NO_PROXY name for `url` (aiohttp's reading of them;
    ALL_PROXY is not one), with its credentials; (None, None) for a direct connection."""
    try:
        return get_env_proxy_for_url(yarl.URL(url))
    except (LookupError, ValueError):
        return None, None


def _unsent(exc: BaseException) -> bool:
    """Whether the request surely never reached the receiver whole, so sending it again at once
    cannot make a second copy: the connection was refused, or aiohttp found the connection
    already closing when it came to write (a kept connection the receiver had closed while it
    sat idle), which it reports as ClientConnectionResetError and nothing else."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return describe(exc, "") == REFUSED
    return any(type(cause) is aiohttp.ClientConnectionResetError for cause in causes(exc))


# The transports carrying the exchange in hand, so a failed one can be aborted (see _Connector).
_CARRIERS: ContextVar[list[asyncio.Transport] | None] = ContextVar("carriers", default=None)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, telling the exchange in hand which transport carries it.

    aiohttp closes the connection of a failed exchange gracefully, and asyncio keeps a socket
    open until its unsent bytes are written: a receiver that stopped reading under a large body
    would hold the socket, and the rest of the body in memory, for as long as the process runs.
    The exchange aborts the transport instead (watcher.sinks.base.HttpSink._send).
    """

    async def connect(self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout) -> Connection:
        connection = await super().connect(req, traces, timeout)
        carriers = _CARRIERS.get()
        if carriers is not None and connection.transport is not None:
            carriers.append(connection.transport)
        return connection


class HttpSink:
    """What every HTTP sink shares: its configuration, an aiohttp session of its own (kept
    connections to its receiver), and the exchange of one request for an Attempt or a DeliveryError."""

    def __init__(self, config: SinkConfig, *, clock: Clock) -> None:
        self.name = config.name
        self.config = config
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._proxy: tuple[yarl.URL | None, aiohttp.BasicAuth | None] = (None, None)

    def _open(self) -> aiohttp.ClientSession:
        """The session, built on first use: aiohttp binds it to the running loop."""
        if self._session is None:
            # The proxy the environment names for this URL, looked up once here: aiohttp's
            # trust_env would look again on every request, with a thread hop to read ~/.netrc,
            # and send that file's credentials for the receiver's host too.
            self._proxy = env_proxy(self.config.url)
            connector = _Connector(
                limit=self.config.concurrency,
                ssl=client_context(),
                happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                keepalive_timeout=KEEPALIVE_EXPIRY,
                # The system's resolver (/etc/hosts, nsswitch), as curl and httpx use, even where
                # aiodns happens to be installed (aiohttp would prefer it).
                resolver=aiohttp.ThreadedResolver(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # The whole exchange is bounded, reading included: a trickling receiver must not hold a slot.
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                # Only what bodies.Decoding reads in bounded steps; we ask for identity anyway.
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # a receiver's cookie never rides on the next event
                # One header line of an answer may be this long (aiohttp's default is 8 KB; httpx took
                # a 100 KB head): a receiver behind a chatty proxy still gets its 2xx counted.
                max_field_size=MAX_HEADER_LINE,
                max_headers=MAX_HEADER_LINES,
            )
        return self._session

    async def _send(self, body: bytes, headers: Mapping[str, str]) -> Answer:
        """One POST; the answer with at most EXCERPT_BYTES of its body, decoded. A failed exchange
        (a timeout, a cancellation) aborts its connection: nothing of it lingers."""
        carriers: list[asyncio.Transport] = []
        token = _CARRIERS.set(carriers)
        try:
            return await self._request(body, headers)
        except BaseException as exc:
            for transport in carriers:
                transport.abort()
            if isinstance(exc, TimeoutError) and not carriers:
                # No connection was made in the time allowed: say so (an unreachable host, not a slow receiver).
                raise aiohttp.ConnectionTimeoutError() from None
            raise
        finally:
            _CARRIERS.reset(token)

    async def _request(self, body: bytes, headers: Mapping[str, str]) -> Answer:
        session = self._open()
        response = await session.post(
            self.config.url,
            data=body,
            headers={**headers, "accept-encoding": "identity"},
            allow_redirects=False,
            proxy=self._proxy[0],
            proxy_auth=self._proxy[1],
        )
        # Not `async with`: its exit releases the connection and then awaits, and a cancellation
        # there would have _send abort a connection another request may already have taken.
        complete = False
        try:
            answer = httpx.Headers(list(response.raw_headers))
            content = b""
            try:
                decoding = Decoding(content_encoding(answer), EXCERPT_BYTES, cut=True)
                complete = True
                async for chunk in response.content.iter_any():
                    if decoding.feed(chunk):
                        complete = False  # the excerpt is full; the rest is never read
                        break
                content = decoding.value()
            except BodyError:
                complete = False  # an encoding not decoded here, or a corrupt one: the status decides
            return Answer(response.status, without_entity_headers(answer), content)
        finally:
            if complete:
                response.release()  # read to its end: the connection serves the next request
            else:
                response.close()  # a body half read cannot be followed by another request

    async def _exchange(
        self,
        build: Callable[[], tuple[bytes, dict[str, str]]],
        classify: Callable[..., DeliveryError | None],
    ) -> Attempt:
        """POST `build()` -> (body, headers); a 2xx is an Attempt, anything else the DeliveryError
        `classify` names. `build` is called per try so each carries its own timestamp and signature.

        A POST is sent at most once per attempt: once a connection has taken the request, a
        failure is this attempt's failure (recorded, retried on the sink's schedule), never a
        hidden second copy. Only a request that surely never went out whole (`_unsent`) is tried
        once more at once.
        """
        started = self._clock.monotonic()
        try:
            try:
                response = await self._send(*build())
            except (aiohttp.ClientError, OSError) as exc:
                if not _unsent(exc):
                    raise
                # Written out rather than a retry policy built per request: this is the hot path.
                if isinstance(exc, aiohttp.ClientConnectorError):
                    await self._clock.sleep(CONNECT_RETRY_WAIT)  # a moment for a restarting receiver
                response = await self._send(*build())
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # TimeoutError is an OSError
            raise failure(exc, self.config.timeout) from None
        duration = self._clock.monotonic() - started
        error = classify(response, now=self._clock.now())
        if error is not None:
            error.excerpt = excerpt(response.text, self.config.url)
            raise error
        return Attempt(
            status=response.status_code,
            duration=duration,
            response_excerpt=excerpt(response.text, self.config.url),
        )

    async def reach(self) -> str:
        """Connect to the receiver, or to the proxy the environment names for it, and for https
        complete the TLS handshake; nothing is sent. Only the host is named: the rest of a sink
        URL (a Slack hook's path) may be a secret."""
        try:
            url = yarl.URL(self.config.url)
        except ValueError:
            raise DeliveryError("sink URL is not a valid http(s) URL") from None
        proxy, _ = env_proxy(self.config.url)
        target = proxy or url
        host, port = target.raw_host or "", target.port
        tls = target.scheme == "https"
        where = f"the proxy {host} port {port} (for host {url.raw_host})" if proxy else f"host {host} port {port}"
        try:
            async with asyncio.timeout(self.config.timeout):
                _, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=client_context() if tls else None,
                    server_hostname=host if tls else None,
                    happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                )
        except TimeoutError:
            raise DeliveryError(f"{where}: timed out connecting after {_seconds(self.config.timeout)}") from None
        except (OSError, ValueError) as exc:
            raise DeliveryError(f"{where}: {failure(exc, self.config.timeout)}") from None
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
        return f"{where}: connected" + (", TLS handshake done" if tls else "")

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
