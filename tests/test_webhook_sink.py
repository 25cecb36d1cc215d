"""The webhook sink against a real loopback receiver, checked with the standardwebhooks library."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import pytest

from tests.support.receiver import Receiver, Reply, verify_request
from watcher import __version__
from watcher.clock import Clock, FakeClock, SystemClock, rfc3339
from watcher.config import SinkConfig
from watcher.errors import DeliveryError, SinkGone, Throttled
from watcher.events import LEAD_CREATED, LEAD_UPDATED, Event, event_id
from watcher.sinks import build_sink
from watcher.sinks.base import Attempt
from watcher.sinks.webhook import WebhookSink

T = TypeVar("T")
SECRET_A = "whsec_" + base64.b64encode(b"A" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(bytes(range(24))).decode()
TOKEN = "s3cr3t-path-token"

LEAD = {
    "@id": "/api/v4/leads/42",
    "id": 42,
    "firstName": "Ada",
    "lastName": "Lovelace",
    "email": "ada@example.org",
    "telephone": "+44 20 7946 0000",
    "postcode": "NW1 6XE",
    "campaign": "/api/v4/campaigns/601",
    "score": 80,
    "leadData": [
        {"name": "email", "value": "ada@example.org"},
        {"name": "jobTitle", "value": "Engineer"},
    ],
}


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def lead_event(type_: str = LEAD_CREATED, data: dict[str, Any] | None = None) -> Event:
    return Event(
        id=event_id(type_, "lead:42", "v1"),
        type=type_,
        timestamp=rfc3339(1_714_557_600.0),
        data=data if data is not None else {"lead": LEAD},
        resource="lead:42",
        campaign_id=601,
    )


def config(url: str, **kw: Any) -> SinkConfig:
    kw.setdefault("secrets", (SECRET_A,))
    kw.setdefault("timeout", 5.0)
    return SinkConfig(name="crm", type="webhook", url=url, **kw)


async def deliver(cfg: SinkConfig, events: list[Event], clock: Clock | None = None) -> Attempt:
    sink = build_sink(cfg, clock=clock or SystemClock(), version=__version__)
    try:
        return await sink.deliver(events)
    finally:
        await sink.aclose()


def fail(cfg: SinkConfig, events: list[Event], clock: Clock | None = None) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        run(deliver(cfg, events, clock))
    return info.value


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver(path=f"/hook/{TOKEN}?key={TOKEN}") as receiver:
        yield receiver


def test_request_carries_the_contract_headers_and_verifies(rx: Receiver) -> None:
    """POST with JSON type, our user agent, the event id, this attempt's timestamp and a valid signature."""
    event = lead_event()
    before = int(SystemClock().now())
    attempt = run(deliver(config(rx.url), [event]))
    after = int(SystemClock().now())
    assert attempt.status == 200
    [req] = rx.requests
    assert req.method == "POST"
    assert req.path == f"/hook/{TOKEN}?key={TOKEN}"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"] == f"convertr-watcher/{__version__}"
    assert req.headers["webhook-id"] == event.id
    assert before <= int(req.headers["webhook-timestamp"]) <= after
    assert rx.verified_events(SECRET_A) == [
        {"type": LEAD_CREATED, "timestamp": event.timestamp, "data": {"lead": LEAD}}
    ]


def test_exact_bytes_are_signed(rx: Receiver) -> None:
    """The bytes on the wire are the event body, unchanged, and those bytes are what verifies."""
    event = lead_event()
    run(deliver(config(rx.url), [event]))
    [req] = rx.requests
    assert req.body == event.body()
    assert verify_request(req, SECRET_A) == json.loads(event.body())


def test_each_attempt_takes_its_timestamp_from_the_clock(rx: Receiver) -> None:
    """Two attempts of one event share the id but carry the clock's time of each attempt."""
    clock = FakeClock(start=1_800_000_000.5)
    event = lead_event()
    run(deliver(config(rx.url), [event], clock))
    clock.advance(300)
    run(deliver(config(rx.url), [event], clock))
    first, second = rx.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == event.id
    assert first.headers["webhook-timestamp"] == "1800000000"
    assert second.headers["webhook-timestamp"] == "1800000300"
    assert len(rx.verified_events(SECRET_A, check_timestamp=False)) == 2


@pytest.mark.parametrize("holder", [SECRET_A, SECRET_B])
def test_rotation_either_key_alone_verifies(rx: Receiver, holder: str) -> None:
    """Signed with two keys, a receiver holding only one of them accepts the request."""
    run(deliver(config(rx.url, secrets=(SECRET_A, SECRET_B)), [lead_event()]))
    [req] = rx.requests
    assert len(req.headers["webhook-signature"].split(" ")) == 2
    assert rx.verified_events(holder) == [json.loads(lead_event().body())]


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_any_2xx_is_success(rx: Receiver, status: int) -> None:
    """Every 2xx is a delivered event, with the status and body excerpt in the attempt."""
    rx.respond(status, b"" if status == 204 else b"thanks")
    attempt = run(deliver(config(rx.url), [lead_event()]))
    assert attempt.status == status
    assert attempt.response_excerpt == ("" if status == 204 else "thanks")
    assert attempt.duration >= 0


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_a_failure_and_not_followed(rx: Receiver, status: int) -> None:
    """3xx fails with its status, and the Location is never requested."""
    rx.respond(status, headers={"location": f"{rx.url}/elsewhere"})
    error = fail(config(rx.url), [lead_event()])
    assert type(error) is DeliveryError
    assert error.status == status
    assert len(rx.requests) == 1


def test_410_means_the_sink_is_gone(rx: Receiver) -> None:
    """410 Gone raises SinkGone so the outbox disables the sink."""
    rx.respond(410)
    error = fail(config(rx.url), [lead_event()])
    assert isinstance(error, SinkGone)
    assert error.status == 410


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retry_after"),
    [
        (429, {"retry-after": "120"}, Throttled, 120.0),
        (429, {}, Throttled, None),
        (503, {"retry-after": "30"}, Throttled, 30.0),
        (503, {}, DeliveryError, None),
        (500, {}, DeliveryError, None),
        (502, {}, DeliveryError, None),
        (400, {}, DeliveryError, None),
        (401, {}, DeliveryError, None),
        (404, {}, DeliveryError, None),
        (413, {}, DeliveryError, None),
    ],
)
def test_status_classification(
    rx: Receiver, status: int, headers: dict[str, str], kind: type[DeliveryError], retry_after: float | None
) -> None:
    """429 and 503-with-Retry-After throttle with the header's value; other failures are plain DeliveryError."""
    rx.respond(status, b"nope", headers)
    error = fail(config(rx.url), [lead_event()])
    assert type(error) is kind
    assert error.status == status
    assert error.retry_after == retry_after


def test_retry_after_http_date_is_converted_with_the_clock(rx: Receiver) -> None:
    """An HTTP-date Retry-After becomes seconds from the sink's clock."""
    clock = FakeClock(start=1_800_000_000.0)
    rx.respond(429, headers={"retry-after": "Fri, 15 Jan 2027 08:01:40 GMT"})  # 1_800_000_100
    error = fail(config(rx.url), [lead_event()], clock)
    assert isinstance(error, Throttled)
    assert error.retry_after == 100.0


def test_hanging_receiver_times_out(rx: Receiver) -> None:
    """A receiver that never answers fails the attempt after the configured timeout, with no status."""
    rx.hang(True)
    started = time.monotonic()
    error = fail(config(rx.url, timeout=0.3), [lead_event()])
    elapsed = time.monotonic() - started
    assert type(error) is DeliveryError
    assert error.status is None
    assert str(error) == "timed out after 0.3s"
    assert 0.25 <= elapsed < 3.0
    assert len(rx.requests) == 1


def test_late_answer_is_a_timeout(rx: Receiver) -> None:
    """An answer that would arrive after the timeout is a timeout, not a late success."""
    rx.respond(200, b"late", delay=1.0)
    error = fail(config(rx.url, timeout=0.3), [lead_event()])
    assert str(error) == "timed out after 0.3s"


@pytest.fixture
def refused_url() -> Iterator[str]:
    # A bound socket that never listens: connecting to it is refused, and nobody can take the port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook/{TOKEN}"


def test_connection_refused_retries_once_after_a_short_wait(refused_url: str) -> None:
    """A refused connection is tried once more 0.2 s later (on the clock), then fails without status."""
    clock = FakeClock()
    error = fail(config(refused_url), [lead_event()], clock)
    assert type(error) is DeliveryError
    assert error.status is None
    assert str(error) == "connection refused"
    assert clock.slept == [0.2]


class ListensOnSleep(FakeClock):
    """A fake clock whose first sleep makes a refusing socket start listening: the blip ends."""

    def __init__(self, sock: socket.socket, start: float) -> None:
        super().__init__(start)
        self.sock = sock
        self.listening = threading.Event()

    async def sleep(self, seconds: float) -> None:
        self.sock.listen()
        self.listening.set()
        await super().sleep(seconds)


def answer_one(clock: ListensOnSleep, heads: list[bytes]) -> None:
    """Once `clock` has made its socket listen, accept one connection, keep the request's head, answer 204."""
    clock.listening.wait(10)
    conn, _ = clock.sock.accept()
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        heads.append(data.split(b"\r\n\r\n")[0])
        conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")


def test_connect_blip_recovers_with_a_fresh_timestamp() -> None:
    """After one refused connection the retry succeeds, carrying the timestamp of the retry itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: refused until the clock's sleep
        clock = ListensOnSleep(sock, start=1_800_000_000.9)
        heads: list[bytes] = []
        server = threading.Thread(target=answer_one, args=(clock, heads), daemon=True)
        server.start()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        attempt = run(deliver(config(url), [lead_event()], clock))
        server.join(5)
    assert attempt.status == 204
    assert clock.slept == [0.2]
    [head] = heads
    assert b"\r\nwebhook-timestamp: 1800000001\r\n" in head


def test_include_pii_false_removes_personal_fields(rx: Receiver) -> None:
    """With include_pii = false the signed body has no personal values; business fields remain."""
    changes = {"email": {"from": "old@example.org", "to": "ada@example.org"}, "score": {"from": 1, "to": 80}}
    event = lead_event(LEAD_UPDATED, {"lead": LEAD, "changes": changes})
    run(deliver(config(rx.url, include_pii=False), [event]))
    [body] = rx.verified_events(SECRET_A)
    text = json.dumps(body)
    for value in ("Ada", "Lovelace", "example.org", "7946", "NW1"):
        assert value not in text
    assert body["data"]["lead"]["id"] == 42
    assert body["data"]["lead"]["leadData"] == [{"name": "jobTitle", "value": "Engineer"}]
    assert body["data"]["changes"] == {"score": {"from": 1, "to": 80}}


def test_include_pii_true_sends_the_document_unchanged(rx: Receiver) -> None:
    """The default webhook payload is the lead document as stored in the event."""
    run(deliver(config(rx.url, include_pii=True), [lead_event()]))
    [body] = rx.verified_events(SECRET_A)
    assert body["data"]["lead"] == LEAD


def secret_free(error: BaseException) -> str:
    text = str(error) + repr(error) + "".join(traceback.format_exception(error))
    assert TOKEN not in text
    assert "127.0.0.1" not in text
    return text


@pytest.mark.parametrize(
    "reply",
    [
        Reply(500, f"failed for http://x/hook/{TOKEN}".encode()),
        Reply(301, headers={"location": f"http://127.0.0.1/hook/{TOKEN}"}),
        Reply(410),
        Reply(429, headers={"retry-after": "5"}),
        Reply(400, b"bad payload from Ada Lovelace"),
    ],
)
def test_url_and_receiver_body_never_reach_the_exception(rx: Receiver, reply: Reply) -> None:
    """Failure messages name the status, never the URL, its path, or what the receiver echoed."""
    rx.respond(reply.status, reply.body, reply.headers)
    text = secret_free(fail(config(rx.url), [lead_event()]))
    assert "Lovelace" not in text


def test_url_never_in_transport_errors(rx: Receiver, refused_url: str) -> None:
    """Timeouts and refused connections are described without the URL."""
    rx.hang(True)
    secret_free(fail(config(rx.url, timeout=0.2), [lead_event()]))
    secret_free(fail(config(refused_url), [lead_event()], FakeClock()))


def test_success_excerpt_is_short_and_redacted(rx: Receiver) -> None:
    """The attempt log excerpt is at most 512 characters and has the sink URL's path redacted."""
    rx.respond(200, (f"got it at {rx.path} " + "x" * 2000).encode())
    attempt = run(deliver(config(rx.url), [lead_event()]))
    assert len(attempt.response_excerpt) <= 512
    assert TOKEN not in attempt.response_excerpt
    assert attempt.response_excerpt.startswith("got it at [redacted]")


def test_build_sink_and_batch_rules() -> None:
    """A webhook sink sends one event per request, unpaced; asking for two is a programming error."""
    sink = build_sink(config("http://127.0.0.1:9/x"), clock=SystemClock(), version="0")
    assert isinstance(sink, WebhookSink)
    assert (sink.max_batch, sink.min_interval, sink.name) == (1, 0.0, "crm")
    with pytest.raises(ValueError):
        run(sink.deliver([lead_event(), lead_event()]))
    run(sink.aclose())


@pytest.mark.parametrize("status", [200, 204])
def test_deliveries_one_after_another_reuse_one_connection(rx: Receiver, status: int) -> None:
    """Ten sends to a receiver answering with an empty body keep one connection (each answer is read to its end)."""
    rx.respond(status)

    async def ten() -> None:
        sink = build_sink(config(rx.url), clock=SystemClock(), version=__version__)
        try:
            for _ in range(10):
                await sink.deliver([lead_event()])
        finally:
            await sink.aclose()

    run(ten())
    assert len(rx.requests) == 10
    assert len({r.port for r in rx.requests}) == 1
