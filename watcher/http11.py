"""HTTP/1.1 with h11 over asyncio: the kept connections to one origin, and their httpx face.

httpx's own pool (httpcore on anyio) costs about 2 ms of CPU a request on the benchmark machine;
h11 alone over asyncio about 0.3 ms (docs/benchmarks.md). Delivery is CPU-bound in the
daemon, and a walk's read-ahead must be on the wire before the page in hand is detected and
committed: here a request on a kept connection is written in its task's first step, where
httpcore needed several turns of the loop.

`Connections` does the protocol (h11) and keeps connections, each a small asyncio Protocol that
knows when bytes arrive while it sits idle; sinks use it directly, and the
Convertr client through `Transport`, an httpx transport, so the client keeps httpx's API (and its
MockTransport in tests). Failures are `ConnectFailed` (no connection was made) or `ExchangeFailed`
(after that), whose texts come from the error's class and errno, never its message: the OS may
quote the host, and a sink URL can be a secret.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import select
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import h11
import httpx

from watcher.tls import client_context

# How long a kept connection may sit unused before it is closed rather than reused: httpx's
# keep-alive expiry, shorter than most servers' and load balancers' idle timeouts.
KEEPALIVE_EXPIRY = 5.0
MAX_IDLE = 32  # connections kept for reuse at most: a sink's concurrency is at most 32
READ_SIZE = 65_536  # bytes held unread before the server is asked to wait
MAX_HEAD_BYTES = 100 * 1024
NO_VALID_ANSWER = "receiver closed the connection without a valid response"
_ERRNO_TEXT = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by the receiver",
    errno.EPIPE: "connection reset by the receiver",
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTUNREACH: "host unreachable",
}


class Http11Error(Exception):
    """An exchange that got no complete answer; the text never holds the URL."""


class ConnectFailed(Http11Error):
    """No connection could be made (refused, unresolvable, TLS handshake): nothing was sent."""


class ExchangeFailed(Http11Error):
    """The request may have been sent, and no complete answer came back."""


class InvalidURL(Http11Error):
    """Not an http(s) URL this client can reach."""


def describe_os_error(exc: BaseException | None, fallback: str) -> str:
    """What a socket-level failure was, in words that hold no host or URL."""
    if isinstance(exc, socket.gaierror):
        return "host name did not resolve"
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return "TLS handshake failed"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_TEXT:
        return _ERRNO_TEXT[exc.errno]
    return fallback


def proxied(url: str) -> bool:
    """Whether httpx, reading the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY), would
    send requests for `url` through a proxy: then httpx's own transport, which speaks to proxies,
    serves it. Decided by httpx's own rules, so that no NO_PROXY spelling sends traffic around a
    proxy that httpx would have used."""
    # Private to httpx (pinned below 1.0); tests/test_transport.py pins the decisions.
    from httpx._utils import URLPattern, get_environment_proxies

    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        return False  # the direct path refuses it with a clear error
    for key, proxy in sorted(get_environment_proxies().items(), key=lambda item: URLPattern(item[0])):
        if URLPattern(key).matches(target):
            return proxy is not None
    return False


def describe_exchange_error(exc: OSError) -> str:
    """A socket-level failure once connected: a TLS error then is not about the handshake."""
    if isinstance(exc, ssl.SSLError):
        return "TLS error during the exchange"
    return describe_os_error(exc, NO_VALID_ANSWER)


@dataclass(frozen=True)
class Origin:
    """Where requests go: host, port, TLS, and the headers every request to it carries."""

    host: str
    port: int
    tls: bool
    headers: tuple[tuple[bytes, bytes], ...]  # Host, and Authorization when the URL has userinfo

    @classmethod
    def of(cls, url: str) -> tuple[Origin, bytes]:
        """The origin of `url` and its request target, both as httpx would send them (the host in
        IDNA 2008 form, the path and query percent-encoded)."""
        if not url.isprintable():
            raise InvalidURL("not a valid http(s) URL")  # a control character would reach the request line
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise InvalidURL("not a valid http(s) URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise InvalidURL("not a valid http(s) URL")
        tls = parsed.scheme == "https"
        headers: list[tuple[bytes, bytes]] = [(b"host", parsed.netloc)]
        if parsed.username or parsed.password:
            # httpx sends a URL's userinfo as basic auth; receivers set up that way keep working.
            pair = f"{parsed.username}:{parsed.password}".encode()
            headers.append((b"authorization", b"Basic " + base64.b64encode(pair)))
        host = parsed.raw_host.decode("ascii")
        return cls(host, parsed.port or (443 if tls else 80), tls, tuple(headers)), parsed.raw_path


class _Stale(Exception):
    """A kept connection the server had closed before a byte of answer: the request may go again."""


class _Connection(asyncio.Protocol):
    """One connection: bytes in are held until h11 asks for them; any byte arriving while the
    connection sits idle, or left over after an answer, makes it unfit for another request."""

    def __init__(self) -> None:
        # httpcore's ceiling for an answer's head; h11's own 16 KB refuses answers httpx took.
        self.protocol = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle_since = 0.0
        self.received_since_request = False
        self._transport: asyncio.Transport | None = None
        self._held = bytearray()
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._held += data
        if len(self._held) >= READ_SIZE and not self._paused and self._transport is not None:
            # Bounded like a StreamReader: a server sending faster than the body is read waits.
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._ended = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- used by the exchange ---------------------------------------------------------------

    def fit_for_reuse(self) -> bool:
        """Nothing arrived since the last answer, the server has not closed it, and the socket has
        nothing waiting either (the loop may not have delivered what came while it was busy)."""
        transport = self._transport
        if self._held or self._ended or transport is None or transport.is_closing():
            return False
        sock = transport.get_extra_info("socket")
        return sock is None or not select.select([sock], [], [], 0)[0]

    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self.received_since_request = False
        self._transport.write(data)

    async def _read(self) -> bytes:
        """What has arrived (waiting for something); b"" once the server has closed."""
        while not self._held and not self._ended:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._held:
            data = bytes(self._held)
            self._held.clear()
            if self._paused and self._transport is not None:
                self._paused = False
                self._transport.resume_reading()
            self.received_since_request = True
            return data
        if isinstance(self._error, OSError):
            raise self._error
        return b""

    async def next_event(self, *, kept: bool) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next h11 event, reading as needed. On a kept connection, an end before any byte of
        answer to this request is _Stale; after one, it is the server's failure to answer."""
        while True:
            event = self.protocol.next_event()
            if event is not h11.NEED_DATA:
                return event
            retry = kept and not self.received_since_request
            try:
                chunk = await self._read()
            except ConnectionError:
                if retry:
                    raise _Stale from None
                raise
            if not chunk and retry:
                raise _Stale
            self.protocol.receive_data(chunk)

    def close(self) -> None:
        """End the connection now: unsent bytes are dropped, not waited for (a receiver that
        stopped reading must not keep the socket open)."""
        if self._transport is not None:
            self._transport.abort()

    def release(self) -> None:
        """A clean close of a connection in good order (the pool is full or closing)."""
        if self._transport is not None:
            self._transport.close()


class Exchange:
    """One answer whose body is still to be read: `chunks()` to the end, then `close()` (always)."""

    def __init__(self, owner: Connections, connection: _Connection, response: h11.Response) -> None:
        self.status = response.status_code
        self.headers: list[tuple[bytes, bytes]] = list(response.headers)
        self._owner = owner
        self._connection: _Connection | None = connection
        self._complete = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The raw body, as it arrives."""
        connection = self._connection
        if connection is None:
            return
        try:
            while True:
                event = await connection.next_event(kept=False)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self._complete = True
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    raise ExchangeFailed(NO_VALID_ANSWER)
        except h11.RemoteProtocolError:
            raise ExchangeFailed(NO_VALID_ANSWER) from None
        except OSError as exc:
            raise ExchangeFailed(describe_exchange_error(exc)) from None

    def close(self) -> None:
        """Keep the connection when the answer was read to its end, else close it (a connection with
        an answer half read cannot carry the next request, nor can one a timeout cut short)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        protocol = connection.protocol
        clean = protocol.our_state is h11.DONE and protocol.their_state is h11.DONE
        # Bytes after the answer's end (pipelined by the server, or a stray second answer) would
        # be read as the next request's answer: such a connection is not reused.
        if self._complete and clean and protocol.trailing_data == (b"", False):
            protocol.start_next_cycle()
            self._owner.keep(connection)
        else:
            connection.close()


class Connections:
    """Kept HTTP/1.1 connections to one origin, any number of requests at once (the caller bounds it)."""

    def __init__(self, origin: Origin, monotonic: Callable[[], float]) -> None:
        self.origin = origin
        self._monotonic = monotonic
        self._idle: list[_Connection] = []
        self._closed = False

    async def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Exchange:
        """Send one request (`headers` are all but the origin's, Content-Length included); the
        answer's status and headers, its body left to read.

        A kept connection that the server closed while it sat idle (or closes under this request
        before any answer) is replaced and the request sent again: the server never answered it,
        and at-least-once allows the rare second copy.
        """
        try:
            request = h11.Request(method=method, target=target, headers=[*self.origin.headers, *headers])
        except h11.LocalProtocolError:
            # h11's text quotes the offending value, which may be a secret URL's host.
            raise ExchangeFailed("the request could not be written (an invalid header value)") from None
        kept = self._take()
        if kept is not None:
            try:
                return await self._exchange(kept, request, body, kept=True)
            except _Stale:
                pass
        return await self._exchange(await self._connect(), request, body, kept=False)

    def keep(self, connection: _Connection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            connection.release()
            return
        connection.idle_since = self._monotonic()
        self._idle.append(connection)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.release()

    def _take(self) -> _Connection | None:
        """The most recently used kept connection still fit for a request, if any. Expired ones
        are closed as they are found, oldest first (kept in the order they went idle)."""
        now = self._monotonic()
        while self._idle and now - self._idle[0].idle_since > KEEPALIVE_EXPIRY:
            self._idle.pop(0).close()
        while self._idle:
            connection = self._idle.pop()
            if connection.fit_for_reuse():
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        origin = self.origin
        loop = asyncio.get_running_loop()
        try:
            if origin.tls:
                _, connection = await loop.create_connection(
                    _Connection, origin.host, origin.port, ssl=client_context(), server_hostname=origin.host
                )
            else:
                _, connection = await loop.create_connection(_Connection, origin.host, origin.port)
        except OSError as exc:  # gaierror, ssl.SSLError and the connection errors are all OSErrors
            raise ConnectFailed(describe_os_error(exc, "connection failed")) from None
        except UnicodeError:  # a host label the resolver cannot encode (longer than 63 characters)
            raise ConnectFailed("host name is not valid") from None
        return connection

    async def _exchange(self, connection: _Connection, request: h11.Request, body: bytes, *, kept: bool) -> Exchange:
        protocol = connection.protocol
        try:
            try:
                data = b"".join(protocol.send(e) or b"" for e in (request, h11.Data(data=body), h11.EndOfMessage()))
            except h11.LocalProtocolError:
                raise ExchangeFailed("the request could not be written (an invalid header value)") from None
            connection.send(data)
            while True:
                event = await connection.next_event(kept=kept)
                if isinstance(event, h11.Response):
                    return Exchange(self, connection, event)
                if isinstance(event, h11.ConnectionClosed):
                    raise ExchangeFailed(NO_VALID_ANSWER)
                # An InformationalResponse (1xx) comes before the answer: read on.
        except BaseException as exc:
            connection.close()
            if isinstance(exc, h11.RemoteProtocolError):
                raise ExchangeFailed(NO_VALID_ANSWER) from None
            if isinstance(exc, OSError):
                raise ExchangeFailed(describe_exchange_error(exc)) from None
            raise


# --- httpx's face -----------------------------------------------------------------------------


class _Body(httpx.AsyncByteStream):
    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._chunks = exchange.chunks()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield chunk
        except ExchangeFailed as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None

    async def aclose(self) -> None:
        # A reader that stopped early (a body over its ceiling) leaves the chunks suspended.
        await self._chunks.aclose()
        self._exchange.close()


class Transport(httpx.AsyncBaseTransport):
    """An httpx transport on `Connections`, one per origin it is asked to reach."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._pools: dict[tuple[str, str, int], Connections] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol("only http and https are supported")
        # raw_host: the IDNA 2008 form httpx resolves and names in TLS, never Python's IDNA 2003 codec.
        key = (url.scheme, url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80))
        pool = self._pools.get(key)
        if pool is None:
            # httpx has already put Host (and any auth) into the request's own headers.
            pool = self._pools[key] = Connections(Origin(key[1], key[2], key[0] == "https", ()), self._monotonic)
        body = await request.aread()
        headers = list(request.headers.raw)  # h11 lower-cases the names itself
        try:
            exchange = await pool.request(request.method.encode(), url.raw_path, headers, body)
        except ConnectFailed as exc:
            raise httpx.ConnectError(str(exc), request=request) from None
        except ExchangeFailed as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from None
        return httpx.Response(exchange.status, headers=exchange.headers, stream=_Body(exchange), request=request)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()
