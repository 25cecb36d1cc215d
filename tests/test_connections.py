"""Connections to receivers and to Convertr, each against real loopback sockets: the five ways the
hand-written HTTP/1.1 layer failed (issue 20), and failures named for what they are (issue 23)."""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import serving
from tests.support.daemon import Daemon, cli, events_json, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver
from tests.support.scripted import NO_CONTENT, read_request
from tests.test_convertr import sim_config
from tests.test_webhook_sink import config, lead_event, run
from watcher import __version__
from watcher.clock import FakeClock, SystemClock
from watcher.convertr import ConvertrClient
from watcher.errors import DeliveryError, TransientError
from watcher.sinks import build_sink
from watcher.tls import client_context

DUAL_STACK = "dual-stack.test"
LOGIN = b'{"access_token": "tok", "token_type": "Bearer", "expires_in": 3600}'


# --- helpers ---------------------------------------------------------------------------------


@contextmanager
def blackhole(port: int) -> Iterator[None]:
    """[::1]:port silently drops connection attempts: a listener whose accept queue is full and that
    never accepts, so the kernel ignores each new SYN (as a firewall that drops IPv6 would)."""
    listener = socket.socket(socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind(("::1", port))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket(socket.AF_INET6)
        filler.setblocking(False)
        with suppress(BlockingIOError):
            filler.connect(("::1", port))
        fillers.append(filler)
    try:
        # The trick holds: a fresh connection to it gets no answer at all.
        with socket.socket(socket.AF_INET6) as probe:
            probe.settimeout(0.3)
            with pytest.raises(TimeoutError):
                probe.connect(("::1", port))
        yield
    finally:
        for s in [*fillers, listener]:
            s.close()


@pytest.fixture
def dual_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """DUAL_STACK resolves to ::1 first, then 127.0.0.1, as a dual-stack host's name does: the one
    thing a loopback test cannot have for real is a DNS record, so the resolver is given one."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        if host in (DUAL_STACK, DUAL_STACK.encode()):
            number = int(port)
            rows = [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", number, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", number)),
            ]
            return [row for row in rows if family in (0, row[0])]
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def sink_error(url: str, **kw: Any) -> DeliveryError:
    sink = build_sink(config(url, **kw), clock=SystemClock(), version=__version__)
    try:
        with pytest.raises(DeliveryError) as info:
            await sink.deliver([lead_event()])
        return info.value
    finally:
        await sink.aclose()


async def login_error(url: str, **kw: Any) -> TransientError:
    async with ConvertrClient(sim_config(url, **kw), clock=FakeClock()) as client:
        with pytest.raises(TransientError) as info:
            await client.login()
        return info.value


# --- 1. Happy Eyeballs ---------------------------------------------------------------------------


def test_a_sink_whose_ipv6_address_drops_packets_is_reached_over_ipv4_at_once(dual_stack: None, rx: Receiver) -> None:
    """The name's first address never answers: the next is tried a fraction of a second later, and the
    event is delivered well inside the sink's timeout (one address at a time waits the whole timeout)."""
    rx.respond(204)
    with blackhole(rx.port):
        started = time.monotonic()
        attempt = run(_deliver(f"http://{DUAL_STACK}:{rx.port}/hook", timeout=5.0))
        took = time.monotonic() - started
    assert attempt == 204
    assert took < 2.5, f"took {took:.2f}s"


async def _deliver(url: str, **kw: Any) -> int | None:
    sink = build_sink(config(url, **kw), clock=SystemClock(), version=__version__)
    try:
        return (await sink.deliver([lead_event()])).status
    finally:
        await sink.aclose()


def test_convertr_behind_an_ipv6_address_that_drops_packets_is_reached_over_ipv4(
    dual_stack: None, rx: Receiver
) -> None:
    """The Convertr client falls back to the next address too: the login succeeds well inside its timeout."""
    rx.respond(200, LOGIN, {"content-type": "application/json"})

    async def go() -> None:
        async with ConvertrClient(sim_config(f"http://{DUAL_STACK}:{rx.port}", timeout=5.0), clock=FakeClock()) as c:
            await c.login()

    with blackhole(rx.port):
        started = time.monotonic()
        run(go())
        took = time.monotonic() - started
    assert took < 2.5, f"took {took:.2f}s"
    assert [r.path for r in rx.requests] == ["/api/login"]


# --- 2. more than 1024 descriptors ---------------------------------------------------------------


def test_deliveries_with_more_than_1024_descriptors_open_all_succeed_and_leak_nothing(rx: Receiver) -> None:
    """A process with 1100 files open (a high LimitNOFILE) delivers one event after another over a kept
    connection: every delivery succeeds, and closing the sink leaves no socket behind."""
    rx.respond(204)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1400
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]

    async def go() -> list[int | None]:
        before = len(os.listdir("/proc/self/fd"))
        sink = build_sink(config(rx.url), clock=SystemClock(), version=__version__)
        try:
            statuses = [(await sink.deliver([lead_event()])).status for _ in range(6)]
        finally:
            await sink.aclose()
        deadline = time.monotonic() + 5
        while len(os.listdir("/proc/self/fd")) > before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(os.listdir("/proc/self/fd")) <= before, "a socket outlived its sink"
        return statuses

    try:
        assert max(held) >= 1024
        assert run(go()) == [204] * 6
        assert len({r.port for r in rx.requests}) == 1  # the connection was kept and reused
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- 3. no hidden resend of a POST ---------------------------------------------------------------


class Dropping:
    """A receiver that answers the first request on each connection and reads the second one whole,
    then drops the connection without answering (a restarting receiver, a proxy's idle cut-off).
    Every copy of every event it reads is counted by webhook-id."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.read: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            for number in (1, 2):
                head = read_request(conn)
                if not head:
                    return
                event = next(
                    line.split(b":", 1)[1].strip().decode()
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"webhook-id:")
                )
                with self._lock:
                    self.read[event] += 1
                if number == 2:
                    return  # read, never answered: the connection goes
                with self._lock:
                    self.answered[event] += 1
                conn.sendall(NO_CONTENT)

    def close(self) -> None:
        self.sock.close()


def test_every_copy_a_receiver_reads_is_an_attempt_in_the_log(tmp_path: Path) -> None:
    """Against a receiver that drops every second request it reads on a kept connection, each event is
    read exactly as many times as `events --attempts` shows attempts for it: no silent second copy."""
    receiver = Dropping()
    try:
        with serving() as (simulator, server):
            sink = webhook_sink(receiver.url, concurrency=4, retry_schedule=["1s"] * 10)
            cfg = write_config(tmp_path, server.url, [sink])
            with Daemon(cfg) as daemon:
                daemon.wait_polls(1)
                campaign = simulator.campaign_ids()[0]
                for _ in range(12):
                    simulator.add_lead(campaign)
                wait_until(
                    lambda: len(rows := events_json(cfg)) == 12 and all(r["status"] == "delivered" for r in rows),
                    60,
                    "all 12 events delivered",
                )
                assert daemon.stop() == 0
        rows = events_json(cfg, "--attempts")
    finally:
        receiver.close()
    logged = {r["id"]: len(r["attempt_log"]) for r in rows}
    assert sum(receiver.read.values()) > 12, "the receiver dropped some requests it read"
    assert dict(receiver.read) == logged
    assert all(receiver.answered[event] == 1 for event in logged)


# --- 4. TLS failures told apart ------------------------------------------------------------------


@pytest.fixture
def trusted_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[trustme.CA]:
    """A CA the process trusts (SSL_CERT_FILE), with the shared TLS context rebuilt for the test and after."""
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    client_context.cache_clear()
    yield ca
    client_context.cache_clear()


@contextmanager
def tls_receiver(cert: trustme.LeafCert) -> Iterator[Receiver]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    with Receiver(tls=context) as receiver:
        yield receiver


def _certificates(ca: trustme.CA) -> dict[str, trustme.LeafCert]:
    now = dt.datetime.now(dt.UTC)
    return {
        "TLS: certificate expired": ca.issue_cert(
            "127.0.0.1", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        ),
        "TLS: unknown CA (the certificate's issuer is not trusted)": trustme.CA().issue_cert("127.0.0.1"),
        "TLS: hostname mismatch (the certificate is for another name)": ca.issue_cert("convertr.example"),
    }


def test_three_tls_failures_are_each_named_for_sinks_and_for_convertr(trusted_ca: trustme.CA) -> None:
    """An expired certificate, an unknown CA and a certificate for another name read differently, for a
    sink and for the Convertr client alike, and nothing reaches the receiver."""
    for text, cert in _certificates(trusted_ca).items():
        with tls_receiver(cert) as receiver:
            base = f"https://127.0.0.1:{receiver.port}"
            sink_failure = run(sink_error(base + "/hook"))
            api_failure = run(login_error(base))
            assert (sink_failure.status, str(sink_failure)) == (None, text)
            assert str(api_failure) == f"Convertr POST /api/login: {text}"
            assert receiver.requests == []


# --- 5. configured timeouts honoured -------------------------------------------------------------


def test_a_receiver_that_never_answers_fails_at_the_sinks_timeout(rx: Receiver) -> None:
    """The sink's `timeout` bounds the exchange: the attempt fails then, saying so."""
    rx.hang()
    started = time.monotonic()
    error = run(sink_error(rx.url, timeout=0.5))
    took = time.monotonic() - started
    rx.hang(False)
    assert str(error) == "timed out after 0.5s"
    assert 0.45 <= took < 3.0, f"took {took:.2f}s"


def test_convertr_that_never_answers_fails_each_try_at_the_configured_timeout(rx: Receiver) -> None:
    """`[convertr] timeout` bounds each request: five tries of 0.5 s, then a transient error saying why."""
    rx.hang()
    started = time.monotonic()
    error = run(login_error(rx.url.removesuffix("/hook"), timeout=0.5))
    took = time.monotonic() - started
    rx.hang(False)
    assert str(error) == "Convertr POST /api/login: timed out"
    assert 2.0 <= took < 8.0, f"took {took:.2f}s"


# --- failures named (issue 23) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "text"),
    [
        pytest.param(lambda: f"http://127.0.0.1:{closed_port()}", "connection refused", id="refused"),
        pytest.param(lambda: "http://convertr.invalid", "host name does not resolve", id="unresolvable"),
    ],
)
def test_connection_failures_say_what_is_wrong(url: Callable[[], str], text: str) -> None:
    """A closed port and a name that does not resolve read as such, for the Convertr client and a sink."""
    base = url()
    assert str(run(login_error(base))) == f"Convertr POST /api/login: {text}"
    assert str(run(sink_error(base + "/hook"))) == text


def test_check_connect_reaches_every_sink_without_sending_an_event(
    tmp_path: Path, trusted_ca: trustme.CA, rx: Receiver
) -> None:
    """`check --connect` connects to each enabled sink (TLS handshake included), sends nothing, and exits 1
    naming each sink it cannot reach and why; the URL's path (a secret for Slack) is never printed."""
    good = trusted_ca.issue_cert("127.0.0.1")
    with serving() as (_simulator, server), tls_receiver(good) as tls_ok:
        expired = _certificates(trusted_ca)["TLS: certificate expired"]
        with tls_receiver(expired) as tls_bad:
            sinks = [
                webhook_sink(rx.url + "/s3cret-path", name="plain"),
                webhook_sink(tls_ok.url + "/s3cret-path", name="tls"),
                webhook_sink(tls_bad.url + "/s3cret-path", name="expired"),
                webhook_sink(f"http://127.0.0.1:{(dead := closed_port())}/s3cret-path", name="dead"),
            ]
            cfg = write_config(tmp_path, server.url, sinks)
            result = cli("check", "-c", str(cfg), "--connect", env={"SSL_CERT_FILE": os.environ["SSL_CERT_FILE"]})
            assert tls_ok.requests == [] and tls_bad.requests == []
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "login: ok" in out
    assert f"sink plain: host 127.0.0.1 port {rx.port}: connected" in out
    assert f"sink tls: host 127.0.0.1 port {tls_ok.port}: connected, TLS handshake done" in out
    assert f"sink expired: cannot reach host 127.0.0.1 port {tls_bad.port}: TLS: certificate expired" in out
    assert f"sink dead: cannot reach host 127.0.0.1 port {dead}: connection refused" in out
    assert "s3cret-path" not in out + result.stderr
    assert rx.requests == []


def test_status_says_what_is_wrong_with_the_api_connection(tmp_path: Path) -> None:
    """After `once` could not reach Convertr (a closed port), `status` shows why in words, not a class name."""
    cfg = write_config(tmp_path, f"http://127.0.0.1:{closed_port()}")
    assert cli("once", "-c", str(cfg)).returncode == 1
    status = cli("status", "-c", str(cfg), "--json")
    assert status.returncode == 0, status.stderr
    [stream] = json.loads(status.stdout)["streams"]
    assert stream["last_error"] == "Convertr POST /api/login: connection refused"
