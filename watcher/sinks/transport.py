"""How a sink's POST reaches its receiver: h11 over asyncio streams, or httpx behind a proxy.

Delivery is CPU-bound in the daemon, and an httpx request costs about 2 ms of CPU on the
benchmark machine (its connection pool, anyio and h11 together), an h11 exchange on a kept
connection about 0.3 ms (docs/benchmarks.md). So `Direct` speaks HTTP/1.1 itself, with h11 for
the protocol: keep-alive connections to the sink's one origin, no redirects, the answer read to a
ceiling. A sink URL that the environment routes through a proxy (HTTP_PROXY, HTTPS_PROXY,
ALL_PROXY and NO_PROXY, read once when the sink is built) goes through `ViaHttpx` instead, since
httpx speaks to proxies.

Both raise only `TransportFailure`, whose text names what went wrong from the error's class and
errno, never from its message: the OS and httpx may quote the host, and a sink URL can be a secret.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import socket
import ssl
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit

import h11
import httpx

from watcher.bodies import Answer, BodyError, Decoding, content_encoding, read_body, without_entity_headers
from watcher.tls import client_context

# How long a kept connection may sit unused before it is closed rather than reused: httpx's
# keep-alive expiry, shorter than most servers' and load balancers' idle timeouts.
KEEPALIVE_EXPIRY = 5.0
# Connections kept for reuse at most: a sink's concurrency rarely passes this.
MAX_IDLE = 32
READ_SIZE = 65_536
# Characters left as they are when a URL's path and query are put on the request line; the rest
# (spaces, non-ASCII) are percent-encoded as httpx would.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


class TransportFailure(Exception):
    """An exchange that got no complete answer. `connecting` when no connection was made at all
    (a refused connection is worth one quick second try; a failure after the request went out is
    the outbox's to retry)."""

    def __init__(self, description: str, *, connecting: bool = False) -> None:
        super().__init__(description)
        self.connecting = connecting


class Transport(Protocol):
    async def post(self, body: bytes, headers: Mapping[str, str], limit: int) -> Answer:
        """POST `body`; the answer with at most `limit` decoded bytes of its body."""
        ...

    async def aclose(self) -> None: ...


def transport_for(url: str, monotonic: Callable[[], float]) -> Transport:
    """The transport for a sink URL: httpx when the environment names a proxy for it, else Direct."""
    return ViaHttpx(url) if proxied(url) else Direct(url, monotonic)


def proxied(url: str) -> bool:
    """Whether the environment's proxy variables send requests for `url` through a proxy."""
    proxies = urllib.request.getproxies_environment()
    parts = urlsplit(url)
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2])


# --- the messages -----------------------------------------------------------------------------

_ERRNO_TEXT = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by the receiver",
    errno.EPIPE: "connection reset by the receiver",
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTUNREACH: "host unreachable",
}
NO_VALID_ANSWER = "receiver closed the connection without a valid response"


def describe_os_error(exc: BaseException | None, fallback: str) -> str:
    """What a socket-level failure was, in words that hold no host or URL."""
    if isinstance(exc, socket.gaierror):
        return "host name did not resolve"
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return "TLS handshake failed"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_TEXT:
        return _ERRNO_TEXT[exc.errno]
    return fallback


# --- h11 over asyncio streams -----------------------------------------------------------------


class _Stale(Exception):
    """A kept connection the receiver had closed: the request may go again on a new one."""


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection
    idle_since: float = 0.0

    def close(self) -> None:
        # Not awaited: the transport finishes closing on its own, and a TLS peer that never
        # answers the close must not hold up a delivery.
        self.writer.close()


@dataclass(frozen=True)
class _Origin:
    host: str
    port: int
    tls: bool
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # Host, and Authorization when the URL has userinfo


def _origin(url: str) -> _Origin:
    parts = urlsplit(url)
    try:
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        authority = parts.netloc.rpartition("@")[2].encode("idna" if not parts.netloc.isascii() else "ascii")
    except (ValueError, UnicodeError):
        raise TransportFailure("sink URL is not a valid http(s) URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise TransportFailure("sink URL is not a valid http(s) URL")
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    headers: list[tuple[bytes, bytes]] = [(b"host", authority)]
    if parts.username is not None:
        # httpx sends a URL's userinfo as basic auth; receivers configured that way keep working.
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers.append((b"authorization", b"Basic " + base64.b64encode(pair)))
    return _Origin(host, port, parts.scheme == "https", target.encode("ascii"), tuple(headers))


class Direct:
    """POSTs to one URL over kept HTTP/1.1 connections, any number at once (the caller bounds it)."""

    def __init__(self, url: str, monotonic: Callable[[], float]) -> None:
        self._url = url
        self._origin: _Origin | None = None
        self._monotonic = monotonic
        self._idle: list[_Connection] = []
        self._closed = False

    async def post(self, body: bytes, headers: Mapping[str, str], limit: int) -> Answer:
        origin = self._origin or self._parse()
        lines = [*origin.headers, *((k.encode(), v.encode()) for k, v in headers.items())]
        lines.append((b"content-length", str(len(body)).encode()))
        request = h11.Request(method=b"POST", target=origin.target, headers=lines)
        kept = self._take()
        if kept is not None:
            try:
                return await self._exchange(kept, request, body, limit)
            except _Stale:
                pass  # closed while it sat idle: the receiver never saw this request
        return await self._exchange(await self._connect(origin), request, body, limit, fresh=True)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _parse(self) -> _Origin:
        self._origin = _origin(self._url)
        return self._origin

    def _take(self) -> _Connection | None:
        """The most recently used kept connection still fit for a request, if any."""
        now = self._monotonic()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since <= KEEPALIVE_EXPIRY and not connection.reader.at_eof():
                return connection
            connection.close()
        return None

    def _keep(self, connection: _Connection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            connection.close()
            return
        connection.idle_since = self._monotonic()
        self._idle.append(connection)

    async def _connect(self, origin: _Origin) -> _Connection:
        try:
            if origin.tls:
                reader, writer = await asyncio.open_connection(
                    origin.host, origin.port, ssl=client_context(), server_hostname=origin.host
                )
            else:
                reader, writer = await asyncio.open_connection(origin.host, origin.port)
        except OSError as exc:  # gaierror, ssl.SSLError and the connection errors are all OSErrors
            raise TransportFailure(describe_os_error(exc, "connection failed"), connecting=True) from None
        return _Connection(reader, writer, h11.Connection(h11.CLIENT))

    async def _exchange(
        self, connection: _Connection, request: h11.Request, body: bytes, limit: int, *, fresh: bool = False
    ) -> Answer:
        """One request and its answer on `connection`, which is kept only if the exchange ended cleanly."""
        done = False
        answered = False
        try:
            protocol = connection.protocol
            try:
                data = b"".join(protocol.send(e) or b"" for e in (request, h11.Data(data=body), h11.EndOfMessage()))
            except h11.LocalProtocolError:
                raise TransportFailure("the request could not be written (an invalid header value)") from None
            connection.writer.write(data)
            await connection.writer.drain()
            status, raw_headers, decoding, complete = 0, httpx.Headers(), None, False
            while True:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    chunk = await connection.reader.read(READ_SIZE)
                    if not chunk and not answered and not fresh:
                        raise _Stale
                    protocol.receive_data(chunk)
                    continue
                answered = True
                if isinstance(event, h11.Response):
                    status = event.status_code
                    raw_headers = httpx.Headers([(k, v) for k, v in event.headers])
                    try:
                        decoding = Decoding(content_encoding(raw_headers), limit, cut=True)
                    except BodyError:
                        break  # an encoding not decoded here: the status decides, the excerpt is empty
                elif isinstance(event, h11.Data):
                    if decoding is not None and decoding.feed(event.data):
                        break  # the excerpt is full; the rest is never read, so the connection goes
                elif isinstance(event, h11.EndOfMessage):
                    complete = True
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise TransportFailure(NO_VALID_ANSWER)
                # InformationalResponse (a 1xx before the answer): read on.
            if not status:
                raise TransportFailure(NO_VALID_ANSWER)
            content = decoding.value() if decoding is not None else b""
            if complete and protocol.our_state is h11.DONE and protocol.their_state is h11.DONE:
                protocol.start_next_cycle()
                done = True
            return Answer(status, without_entity_headers(raw_headers), content)
        except BodyError:
            # A corrupt compressed body: the status stands, the excerpt is empty.
            return Answer(status, without_entity_headers(raw_headers), b"")
        except ConnectionError as exc:
            if not answered and not fresh:
                raise _Stale from None
            raise TransportFailure(describe_os_error(exc, NO_VALID_ANSWER)) from None
        except h11.RemoteProtocolError:
            raise TransportFailure(NO_VALID_ANSWER) from None
        except OSError as exc:
            raise TransportFailure(describe_os_error(exc, f"transport error ({type(exc).__name__})")) from None
        finally:
            # Anything short of a clean end (a timeout's cancellation included) closes it: a
            # connection with an answer half read cannot carry the next request.
            if done:
                self._keep(connection)
            else:
                connection.close()


# --- httpx, for a sink behind a proxy ---------------------------------------------------------


def _root_os_error(exc: BaseException) -> OSError | None:
    """The innermost OSError under an httpx error (anyio wraps the real one in a generic OSError)."""
    found: OSError | None = None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            found = current
        current = current.__cause__ or current.__context__
    return found


def describe_httpx_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.RemoteProtocolError):
        return NO_VALID_ANSWER
    if isinstance(exc, httpx.ProxyError):
        return "proxy error"
    fallback = "connection failed" if isinstance(exc, httpx.ConnectError) else f"transport error ({type(exc).__name__})"
    return describe_os_error(_root_os_error(exc), fallback)


class ViaHttpx:
    """POSTs through an httpx client, which finds the proxy in the environment."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._client = httpx.AsyncClient(follow_redirects=False, timeout=None, verify=client_context())

    async def post(self, body: bytes, headers: Mapping[str, str], limit: int) -> Answer:
        try:
            async with self._client.stream("POST", self._url, content=body, headers=headers) as response:
                try:
                    content = await read_body(response, limit, cut=True)
                except BodyError:
                    content = b""
                return Answer(response.status_code, without_entity_headers(response.headers), content)
        except httpx.TransportError as exc:
            raise TransportFailure(describe_httpx_error(exc), connecting=isinstance(exc, httpx.ConnectError)) from None
        except httpx.InvalidURL:
            raise TransportFailure("sink URL is not a valid http(s) URL") from None

    async def aclose(self) -> None:
        await self._client.aclose()
