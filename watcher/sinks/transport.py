"""How a sink's POST reaches its receiver: kept h11 connections (watcher.http11), or httpx behind a proxy.

A sink URL that the environment routes through a proxy goes through `ViaHttpx`, since httpx
speaks to proxies; every other sink through `Direct`. Both raise only `TransportFailure`, whose
text never holds the URL (a sink URL can be a secret).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import aclosing
from typing import Protocol

import httpx

from watcher.bodies import Answer, BodyError, Decoding, content_encoding, read_body, without_entity_headers
from watcher.http11 import (
    NO_VALID_ANSWER,
    ConnectFailed,
    Connections,
    Http11Error,
    Origin,
    describe_os_error,
    proxied,
)
from watcher.tls import client_context


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
    """The transport for a sink URL, chosen once when the sink is built."""
    return ViaHttpx(url) if proxied(url) else Direct(url, monotonic)


class Direct:
    """POSTs to one URL over kept connections; the answer decoded up to the excerpt ceiling."""

    def __init__(self, url: str, monotonic: Callable[[], float]) -> None:
        self._url = url
        self._monotonic = monotonic
        self._connections: Connections | None = None
        self._target = b""

    async def post(self, body: bytes, headers: Mapping[str, str], limit: int) -> Answer:
        connections = self._connections or self._open()
        lines = [(k.encode(), v.encode()) for k, v in headers.items()]
        lines.append((b"content-length", str(len(body)).encode()))
        try:
            exchange = await connections.request(b"POST", self._target, lines, body)
        except ConnectFailed as exc:
            raise TransportFailure(str(exc), connecting=True) from None
        except Http11Error as exc:
            raise TransportFailure(str(exc)) from None
        try:
            answer = httpx.Headers(exchange.headers)
            content = b""
            try:
                decoding = Decoding(content_encoding(answer), limit, cut=True)
                async with aclosing(exchange.chunks()) as chunks:
                    async for chunk in chunks:
                        if decoding.feed(chunk):
                            break  # the excerpt is full; the rest is never read, so the connection goes
                content = decoding.value()
            except BodyError:
                pass  # an encoding not decoded here, or a corrupt one: the status decides
            except Http11Error as exc:
                raise TransportFailure(str(exc)) from None
            return Answer(exchange.status, without_entity_headers(answer), content)
        finally:
            exchange.close()

    async def aclose(self) -> None:
        if self._connections is not None:
            await self._connections.aclose()

    def _open(self) -> Connections:
        try:
            origin, self._target = Origin.of(self._url)
        except Http11Error:
            raise TransportFailure("sink URL is not a valid http(s) URL") from None
        self._connections = Connections(origin, self._monotonic)
        return self._connections


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
    # No TimeoutException: the client has no timeouts of its own, sinks.post bounds the exchange.
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
