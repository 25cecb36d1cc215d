"""Loopback HTTP receivers for tests: record every request, answer by a policy changed at will.

    with Receiver() as rx:
        rx.respond_sequence([500, 500, 200])      # then the default (200, empty body)
        ... deliver to rx.url ...
        rx.wait_for(lambda reqs: len(reqs) >= 3)  # waits on a Condition, never polls
        events = rx.verified_events("whsec_...")  # bodies checked by the standardwebhooks library

`hang(True)` holds every new request until `hang(False)` or close, for timeout tests.
`FakeSlack` answers "ok" like a Slack incoming webhook.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.support.schemas import validate_event


@dataclass(frozen=True)
class Reply:
    """How the receiver answers one request."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to hold the answer (woken early by close)


@dataclass
class Request:
    """One recorded request; `status` is what was answered (None while held or when the client left)."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    received_at: float  # time.monotonic()
    status: int | None = None
    port: int = 0  # the client's port: one per connection it used

    def json(self) -> Any:
        return json.loads(self.body)


def verify_request(request: Request, secret: str, *, check_timestamp: bool = True) -> Any:
    """The parsed body if `secret` verifies the request, by the standardwebhooks library.

    With `check_timestamp=False` the library's 5-minute window is skipped (for fake clocks): the
    library signs the request's own id and timestamp and one of the sent signatures must match.
    """
    hook = Webhook(secret)
    if check_timestamp:
        return hook.verify(request.body, request.headers)
    try:
        msg_id = request.headers["webhook-id"]
        stamp = datetime.fromtimestamp(int(request.headers["webhook-timestamp"]), tz=UTC)
        sent = request.headers["webhook-signature"].split(" ")
    except (KeyError, ValueError) as exc:
        raise WebhookVerificationError(f"missing or bad header: {exc}") from None
    if hook.sign(msg_id, stamp, request.body.decode()) not in sent:
        raise WebhookVerificationError("No matching signature found")
    return json.loads(request.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):  # the client may have gone already
            super().finish()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _handle(self) -> None:
        receiver = self.server.receiver
        body = self._read_body()
        declared = self.headers.get("content-length")
        if declared is not None and len(body) < int(declared):
            # The client died mid-body (a SIGKILLed daemon): like any server, drop the fragment.
            self.close_connection = True
            return
        request = Request(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            received_at=time.monotonic(),
            port=int(self.client_address[1]),
        )
        reply = receiver._arrive(request)
        if reply is None:  # closing while the request was held
            self.close_connection = True
            return
        try:
            self.send_response(reply.status)
            names = {k.lower() for k in reply.headers}
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if "content-length" not in names:
                self.send_header("content-length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
            self.wfile.flush()
        except OSError:  # the client gave up (timeout) before the answer
            self.close_connection = True
            return
        receiver._answered(request, reply.status)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Receiver:
    """A threaded HTTP server on 127.0.0.1 (random port) that records requests and answers by policy."""

    default_reply = Reply()

    def __init__(self, path: str = "/hook", tls: ssl.SSLContext | None = None) -> None:
        self.path = path
        self.scheme = "https" if tls else "http"
        self._cond = threading.Condition()
        self._requests: list[Request] = []
        self._default = self.default_reply
        self._queue: deque[Reply] = deque()
        self._hanging = False
        self._closing = False
        self._server = _Server(self)
        if tls is not None:
            # Each accepted connection does its handshake before its request is read.
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        # A short poll interval only bounds how long close() takes; requests are served as they come.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), name="receiver", daemon=True)
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._started:
            self._server.shutdown()
            self._thread.join(timeout=5)
        for conn in list(self._server.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{self.path}"

    # -- policy ---------------------------------------------------------------------------

    def respond(
        self, status: int = 200, body: bytes = b"", headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> None:
        """Set the default answer (used whenever the sequence is empty)."""
        with self._cond:
            self._default = Reply(status, body, dict(headers or {}), delay)

    def respond_sequence(self, replies: Iterable[int | Reply]) -> None:
        """Answer the next requests with these, in order, then fall back to the default."""
        with self._cond:
            self._queue.extend(r if isinstance(r, Reply) else Reply(status=r) for r in replies)

    def hang(self, on: bool = True) -> None:
        """Hold every request (already arrived or new) without answering until `hang(False)` or close."""
        with self._cond:
            self._hanging = on
            self._cond.notify_all()

    # -- observation ----------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        """A snapshot of every request so far, in arrival order."""
        with self._cond:
            return list(self._requests)

    def wait_for(
        self, predicate: Callable[[list[Request]], bool], timeout: float = 10.0, what: str = ""
    ) -> list[Request]:
        """Block until `predicate(requests)` holds; AssertionError naming what was seen on deadline."""
        with self._cond:
            if self._cond.wait_for(lambda: predicate(list(self._requests)), timeout):
                return list(self._requests)
            seen = ", ".join(f"{r.method} {r.path} -> {r.status}" for r in self._requests[-10:])
            raise AssertionError(
                f"receiver: timed out after {timeout}s waiting for {what or predicate!r}; "
                f"{len(self._requests)} requests so far (last: {seen or 'none'})"
            )

    def wait_for_count(self, n: int, timeout: float = 10.0) -> list[Request]:
        """Block until at least `n` requests have arrived."""
        return self.wait_for(lambda reqs: len(reqs) >= n, timeout, what=f"{n} requests")

    def event_ids(self) -> list[str]:
        """The `webhook-id` of every POST, in arrival order (duplicates kept)."""
        return [r.headers.get("webhook-id", "") for r in self.requests if r.method == "POST"]

    def verified_events(self, secret: str, *, check_timestamp: bool = True) -> list[Any]:
        """Every POST body, verified by standardwebhooks and validated against the event schemas."""
        out = []
        for i, request in enumerate(self.requests):
            if request.method != "POST":
                continue
            try:
                body = verify_request(request, secret, check_timestamp=check_timestamp)
            except (WebhookVerificationError, ValueError) as exc:
                msg_id = request.headers.get("webhook-id")
                raise AssertionError(f"request #{i} ({msg_id}) failed verification: {exc}") from exc
            validate_event(body)  # every event a test verifies also matches its shipped JSON Schema
            out.append(body)
        return out

    # -- called from handler threads ------------------------------------------------------

    def _arrive(self, request: Request) -> Reply | None:
        with self._cond:
            self._requests.append(request)
            reply = self._queue.popleft() if self._queue else self._default
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._hanging or self._closing)
            if reply.delay > 0:
                self._cond.wait_for(lambda: self._closing, reply.delay)
            return None if self._closing else reply

    def _answered(self, request: Request, status: int) -> None:
        with self._cond:
            request.status = status
            self._cond.notify_all()


class FakeSlack(Receiver):
    """A Slack incoming webhook: answers `ok`, records each message and its arrival time."""

    default_reply = Reply(200, b"ok", {"content-type": "text/plain; charset=utf-8"})

    def __init__(self, path: str = "/services/T0FAKE000/B0FAKE000/abcdefghijklmnopqrstuvwx") -> None:
        super().__init__(path)

    def fail_with(self, error: str, status: int, headers: Mapping[str, str] | None = None) -> None:
        """Answer every later message with Slack's plain-text error string."""
        merged = {"content-type": "text/plain; charset=utf-8", **(headers or {})}
        self.respond(status, error.encode(), merged)

    def messages(self) -> list[Any]:
        """The JSON payload of every POST, in arrival order."""
        return [r.json() for r in self.requests if r.method == "POST"]

    def arrival_times(self) -> list[float]:
        """`time.monotonic()` at each POST's arrival, for pacing checks."""
        return [r.received_at for r in self.requests if r.method == "POST"]
