"""The sinks' HTTP path on aiohttp: TLS, kept connections and their failures, proxies, against real sockets."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import trustme

from tests.support.receiver import Receiver, Reply
from tests.support.scripted import NO_CONTENT, Scripted, answer, read_request
from tests.test_webhook_sink import SECRET_A, config, deliver, fail, lead_event, run, secret_free
from watcher import __version__
from watcher.clock import FakeClock, SystemClock
from watcher.errors import DeliveryError
from watcher.sinks import build_sink
from watcher.sinks.base import NO_ANSWER
from watcher.tls import client_context


async def deliver_twice(url: str) -> tuple[int | None, int | None]:
    """Two deliveries through one sink (so the second may reuse the first's connection)."""
    sink = build_sink(config(url), clock=SystemClock(), version=__version__)
    try:
        first = await sink.deliver([lead_event()])
        second = await sink.deliver([lead_event()])
        return first.status, second.status
    finally:
        await sink.aclose()


# --- kept connections ---------------------------------------------------------------------


def test_a_kept_connection_closed_under_the_request_fails_the_attempt_and_sends_no_copy(
    scripted: Callable[..., Scripted],
) -> None:
    """The receiver reads the second request on a kept connection and drops it: that attempt fails, and the
    request is not sent again behind the attempt log's back (the dispatcher retries it, as a new attempt)."""
    server = scripted(answer(NO_CONTENT, read_more=True), answer(NO_CONTENT))

    async def two() -> tuple[int | None, str]:
        sink = build_sink(config(server.url), clock=SystemClock(), version=__version__)
        try:
            first = await sink.deliver([lead_event()])
            with pytest.raises(DeliveryError) as info:
                await sink.deliver([lead_event()])
            return first.status, str(info.value)
        finally:
            await sink.aclose()

    assert run(two()) == (204, NO_ANSWER)
    assert server.conns == [0, 0]  # read once, on the kept connection; never on a second one


def test_a_receiver_that_closes_after_each_answer_costs_a_connection_not_a_failure(
    scripted: Callable[..., Scripted],
) -> None:
    """A receiver that says `Connection: close` and closes after each answer gets each request on a new connection."""
    closing = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    server = scripted(answer(closing), answer(closing))
    assert run(deliver_twice(server.url)) == (204, 204)
    assert server.conns == [0, 1]


def test_a_kept_connection_the_receiver_closed_while_idle_is_not_used(scripted: Callable[..., Scripted]) -> None:
    """A receiver that closes a kept connection some time after answering (an idle timeout): the next
    delivery goes on a new connection and succeeds."""
    server = scripted(answer(NO_CONTENT), answer(NO_CONTENT))

    async def two() -> tuple[int | None, int | None]:
        sink = build_sink(config(server.url), clock=SystemClock(), version=__version__)
        try:
            first = await sink.deliver([lead_event()])
            await asyncio.sleep(0.2)  # the receiver's close arrives while the connection sits idle
            second = await sink.deliver([lead_event()])
            return first.status, second.status
        finally:
            await sink.aclose()

    assert run(two()) == (204, 204)
    assert server.conns == [0, 1]


def test_an_answer_cut_off_mid_body_fails_without_a_status(scripted: Callable[..., Scripted]) -> None:
    """Headers promising 100 bytes, then 5 and a close: no status, the transport's words, nothing resent."""
    server = scripted(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello"))
    error = fail(config(server.url), [lead_event()])
    assert type(error) is DeliveryError
    assert (error.status, str(error)) == (None, NO_ANSWER)
    assert len(server.heads) == 1


def test_garbage_instead_of_an_answer_is_a_failure_without_a_status(scripted: Callable[..., Scripted]) -> None:
    """A reply that is not HTTP fails the attempt with no status, and the URL stays out of the text."""
    server = scripted(answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    error = fail(config(server.url), [lead_event()])
    assert (error.status, str(error)) == (None, "the receiver's answer is not valid HTTP")
    secret_free(error)


def test_a_chunked_answer_is_excerpted_and_its_connection_kept(scripted: Callable[..., Scripted]) -> None:
    """A chunked 200 is read to its end: the excerpt holds its text and the next request reuses the connection."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nthx\r\n0\r\n\r\n"
    server = scripted(answer(chunked, chunked))

    async def two() -> list[str]:
        sink = build_sink(config(server.url), clock=SystemClock(), version=__version__)
        try:
            return [(await sink.deliver([lead_event()])).response_excerpt for _ in range(2)]
        finally:
            await sink.aclose()

    assert run(two()) == ["thx", "thx"]
    assert server.conns == [0, 0]


def test_after_a_timeout_the_late_answer_is_never_taken_for_the_next(rx: Receiver) -> None:
    """A timed-out exchange closes its connection, so the next request cannot read the late answer as its own."""
    rx.respond(204)
    rx.respond_sequence([Reply(200, b"late", delay=0.6)])

    async def two() -> tuple[str, str]:
        sink = build_sink(config(rx.url, timeout=0.3), clock=SystemClock(), version=__version__)
        try:
            with pytest.raises(DeliveryError) as info:
                await sink.deliver([lead_event()])
            second = await sink.deliver([lead_event()])
            return str(info.value), second.response_excerpt
        finally:
            await sink.aclose()

    assert run(two()) == ("timed out after 0.3s", "")
    first, second = rx.wait_for_count(2)[:2]
    assert first.port != second.port


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_rx(ca: trustme.CA) -> Iterator[Receiver]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with Receiver(tls=context) as receiver:
        yield receiver


@pytest.fixture
def fresh_trust() -> Iterator[None]:
    """The process's shared TLS context is rebuilt for the test and again after it."""
    client_context.cache_clear()
    yield
    client_context.cache_clear()


def test_https_receiver_with_a_trusted_certificate_gets_the_signed_event(
    tls_rx: Receiver, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_trust: None
) -> None:
    """With its CA in SSL_CERT_FILE, an https receiver gets events that verify, over one kept connection."""
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert run(deliver_twice(tls_rx.url)) == (200, 200)
    assert len(tls_rx.verified_events(SECRET_A)) == 2
    assert len({r.port for r in tls_rx.requests}) == 1


def test_an_untrusted_certificate_fails_the_handshake_and_names_no_url(tls_rx: Receiver, fresh_trust: None) -> None:
    """A receiver whose certificate no trusted CA signed gets nothing; the error says so without the URL."""
    error = fail(config(tls_rx.url), [lead_event()])
    assert (error.status, str(error)) == (None, "TLS: unknown CA (the certificate's issuer is not trusted)")
    assert tls_rx.requests == []


# --- the URL itself -------------------------------------------------------------------------


def test_userinfo_in_the_url_is_sent_as_basic_auth(rx: Receiver) -> None:
    """`https://user:pass@host/...` authenticates as httpx would, with the credentials decoded."""
    url = rx.url.replace("://", "://hook%40user:s3cret@")
    run(deliver(config(url), [lead_event()]))
    [request] = rx.requests
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"hook@user:s3cret").decode()
    assert request.headers["host"] == f"127.0.0.1:{rx.port}"


def test_a_path_with_spaces_and_non_ascii_is_percent_encoded(rx: Receiver) -> None:
    """Characters a request line cannot hold are escaped; existing escapes are kept as they are."""
    rx.path = "/hook/caf%C3%A9%20bar"
    run(deliver(config(f"http://127.0.0.1:{rx.port}/hook/café bar"), [lead_event()]))
    assert [r.path for r in rx.requests] == ["/hook/caf%C3%A9%20bar"]


# --- proxies --------------------------------------------------------------------------------


def test_a_proxied_sink_sends_its_request_to_the_proxy(
    scripted: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HTTP_PROXY set, the POST goes to the proxy in absolute form, and the proxy's answer counts."""
    proxy = scripted(answer(NO_CONTENT))
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url.removesuffix("/hook"))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # nothing listens here: only the proxy can answer
        target = f"http://127.0.0.1:{unused.getsockname()[1]}/hook"
        attempt = run(deliver(config(target), [lead_event()]))
    assert attempt.status == 204
    [head] = proxy.heads
    assert head.startswith(f"POST {target} HTTP/1.1".encode())


def test_many_concurrent_deliveries_share_a_few_connections(rx: Receiver) -> None:
    """Forty deliveries eight at a time are all answered, over at most eight connections."""
    rx.respond(204)

    async def forty() -> list[int | None]:
        sink = build_sink(config(rx.url), clock=SystemClock(), version=__version__)
        gate = asyncio.Semaphore(8)

        async def one() -> int | None:
            async with gate:
                return (await sink.deliver([lead_event()])).status

        try:
            return await asyncio.gather(*(one() for _ in range(40)))
        finally:
            await sink.aclose()

    assert run(forty()) == [204] * 40
    assert len({r.port for r in rx.requests}) <= 8


# --- what an earlier version got wrong (each failed before its fix) ---------------------------


def test_bytes_after_an_answer_never_become_the_next_answer(scripted: Callable[..., Scripted]) -> None:
    """A stray second answer sent with the first makes the connection unfit: the next request gets its own 503."""
    stray = NO_CONTENT + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
    rejected = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
    server = scripted(answer(stray), answer(rejected))

    async def two() -> tuple[int | None, DeliveryError]:
        sink = build_sink(config(server.url), clock=SystemClock(), version=__version__)
        try:
            first = await sink.deliver([lead_event()])
            with pytest.raises(DeliveryError) as info:
                await sink.deliver([lead_event()])
            return first.status, info.value
        finally:
            await sink.aclose()

    status, error = run(two())
    assert (status, error.status) == (204, 503)
    assert server.conns == [0, 1]


def test_an_answer_head_larger_than_16_kb_in_two_reads_is_accepted(scripted: Callable[..., Scripted]) -> None:
    """A 40 KB answer head that arrives in two pieces is read whole (httpx took up to 100 KB)."""
    head = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-Padding: " + b"p" * 40_000 + b"\r\n\r\n"

    def in_two(conn: socket.socket, heads: list[bytes]) -> None:
        heads.append(read_request(conn))
        conn.sendall(head[:20_000])
        threading.Event().wait(0.2)  # the server's pacing: the head reaches the client in two reads
        conn.sendall(head[20_000:])

    server = scripted(in_two)
    assert run(deliver(config(server.url), [lead_event()])).status == 204


def test_a_close_after_the_first_byte_of_an_answer_is_not_resent(scripted: Callable[..., Scripted]) -> None:
    """Part of an answer, then a close: the attempt failed, and is not sent again at once (the outbox retries it)."""

    def half_answer(conn: socket.socket, heads: list[bytes]) -> None:
        heads.append(read_request(conn))
        conn.sendall(NO_CONTENT)
        heads.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-")

    server = scripted(half_answer, answer(NO_CONTENT))

    async def two() -> str:
        sink = build_sink(config(server.url), clock=SystemClock(), version=__version__)
        try:
            await sink.deliver([lead_event()])
            with pytest.raises(DeliveryError) as info:
                await sink.deliver([lead_event()])
            return str(info.value)
        finally:
            await sink.aclose()

    assert run(two()) == NO_ANSWER
    assert server.conns == [0, 0]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_timed_out_request_with_unsent_bytes_frees_its_socket(scripted: Callable[..., Scripted]) -> None:
    """A receiver that stops reading under a 16 MB body: after the timeout the socket is gone, not left draining."""
    stop = threading.Event()

    def never_read(conn: socket.socket, heads: list[bytes]) -> None:
        stop.wait(10)

    server = scripted(never_read)
    big = lead_event(data={"lead": {"id": 42, "notes": "x" * 16_000_000}})

    async def go() -> int:
        sink = build_sink(config(server.url, timeout=0.3), clock=SystemClock(), version=__version__)
        before = open_fds()
        try:
            with pytest.raises(DeliveryError, match="timed out"):
                await sink.deliver([big])
            # One descriptor stays: the receiver's end, held open by the server thread in this process.
            deadline = asyncio.get_running_loop().time() + 5
            while open_fds() > before + 1 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            return open_fds() - before
        finally:
            await sink.aclose()

    try:
        assert run(go()) <= 1  # only the receiver's end (another test's socket closing may take one more)
    finally:
        stop.set()


def test_a_host_label_too_long_to_resolve_is_a_delivery_error() -> None:
    """A 70-character label fails the attempt with words, not a UnicodeError traceback (nothing is looked up)."""
    error = fail(config("http://" + "a" * 70 + ".example/hook"), [lead_event()], FakeClock())
    assert (type(error), str(error)) == (DeliveryError, "host name is not valid")


def _reset(conn: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a crashing receiver's kernel does."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def _read_then(reply: bytes, reset: bool = False) -> Callable[[socket.socket, list[bytes]], None]:
    def script(conn: socket.socket, heads: list[bytes]) -> None:
        heads.append(read_request(conn))
        if reply:
            # A client that refuses an answer part way (a 2 MB head) hangs up before it is all sent;
            # how soon depends on scheduling, so a broken pipe here is the client doing its job.
            with suppress(BrokenPipeError, ConnectionResetError):
                conn.sendall(reply)
        if reset:
            _reset(conn)

    return script


@pytest.mark.parametrize(
    ("script", "text"),
    [
        pytest.param(_read_then(b"", reset=True), "connection reset by the peer", id="reset before an answer"),
        pytest.param(
            _read_then(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nab", reset=True), NO_ANSWER, id="reset mid-body"
        ),
        pytest.param(
            _read_then(b"HTTP/1.1 204 No Content\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n"),
            "the receiver's answer is not valid HTTP",
            id="a 2 MB header",
        ),
        pytest.param(
            _read_then(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            "the receiver's answer is not valid HTTP",
            id="Content-Length with chunked",
        ),
    ],
)
def test_a_broken_answer_fails_its_attempt_once_named_and_never_resent(
    scripted: Callable[..., Scripted], script: Callable[[socket.socket, list[bytes]], None], text: str
) -> None:
    """Resets and malformed answers: the attempt fails with words naming no URL, and the receiver read it once
    (a copy sent again would find no one accepting and time out instead)."""
    server = scripted(script)
    error = fail(config(server.url), [lead_event()])
    assert (error.status, str(error)) == (None, text)
    secret_free(error)
    assert len(server.heads) == 1


def test_a_2xx_with_many_header_lines_is_a_success(scripted: Callable[..., Scripted]) -> None:
    """A 204 carrying 300 header lines (a receiver behind proxies adding cookies, CSP, tracing) is a
    success: were it refused as invalid HTTP, the event would go again and again to a receiver that had it."""
    lines = b"".join(b"Set-Cookie: c%d=v; Path=/\r\n" % n for n in range(300))
    reply = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n" + lines + b"\r\n"
    server = scripted(answer(reply))
    assert run(deliver(config(server.url), [lead_event()])).status == 204
    assert len(server.heads) == 1
