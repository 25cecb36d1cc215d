"""`convertr-watcher run` as a systemd service: sd_notify, the watchdog, /metrics and /healthz."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import WEBHOOK_KEY, Daemon, wait_until, webhook_sink, write_config
from tests.support.receiver import Receiver
from watcher.clock import SystemClock
from watcher.config import load_config
from watcher.daemon import Daemon as InProcessDaemon
from watcher.liveness import Liveness, health_intervals, liveness_problem
from watcher.notify import Notifier
from watcher.runtime import runtime
from watcher.simulator import Simulator, SimulatorServer

WATCHDOG_USEC = 2_000_000  # systemd would abort after 2 s without a ping
STREAMS = ("leads.created", "leads.updated", "campaigns")


# --- a fake systemd notify socket -----------------------------------------------------------


# Linux's SO_TIMESTAMPNS (asm-generic; Python's socket module does not name it): the kernel stamps
# each datagram with the wall time it was queued to the socket, i.e. when the daemon sent it.
SO_TIMESTAMPNS = 35


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET.

    Each message is timed by when the daemon sent it (the kernel's stamp), not when this test got
    round to reading it: the test reads only inside wait_for and quiet, so pings sent meanwhile
    (during daemon.wait_polls, or while a loaded machine runs other work) would read as one late
    burst, a gap the daemon never left.
    """

    def __init__(self, path: Path) -> None:
        assert len(str(path)) < 100, "AF_UNIX paths are limited to 107 bytes"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []  # (time.monotonic() when sent, fields)

    def close(self) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancillary, _flags, _address = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("@ll")))
        except TimeoutError:
            return False
        now, wall = time.monotonic(), time.time()
        [stamp] = [d for level, kind, d in ancillary if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS)]
        seconds, nanoseconds = struct.unpack("@ll", stamp[: struct.calcsize("@ll")])
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((now - (wall - (seconds + nanoseconds / 1e9)), fields))
        return True

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float, what: str) -> int:
        """Receive until a message satisfies `predicate`; its index in `messages`."""
        for i, (_, fields) in enumerate(self.messages):
            if predicate(fields):
                return i
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._receive(deadline - time.monotonic()) and predicate(self.messages[-1][1]):
                return len(self.messages) - 1
        raise AssertionError(f"no {what} within {timeout}s; got {[m for _, m in self.messages]}")

    def quiet(self, seconds: float) -> list[dict[str, str]]:
        """Everything that arrives during the next `seconds`."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._receive(deadline - time.monotonic())
        return [m for _, m in self.messages[start:]]

    def count(self, key: str, since: int = 0) -> int:
        return sum(1 for _, m in self.messages[since:] if key in m)


def test_run_notifies_ready_status_watchdog_after_progress_and_stopping(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """READY and STATUS come at start; WATCHDOG only once the API answered; STOPPING on SIGTERM, then exit 0."""
    simulator, server = sim
    simulator.faults.hang = True  # no request can finish: no progress yet
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], convertr={"timeout": "30s"})
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    try:
        with Daemon(config, env=env) as daemon:
            ready = notify.wait_for(lambda m: "READY" in m, 20, "READY=1")
            assert notify.messages[ready][1]["READY"] == "1"
            notify.wait_for(lambda m: "STATUS" in m, 5, "a STATUS line")
            # Pings would come every 0.9 s if they were unconditional; none may while nothing moved.
            assert not any("WATCHDOG" in m for m in notify.quiet(2.5)), "WATCHDOG before any progress"
            assert notify.count("WATCHDOG") == 0 and simulator.requests == []

            simulator.faults.hang = False
            first = notify.wait_for(lambda m: "WATCHDOG" in m, 20, "WATCHDOG=1 after progress")
            assert notify.messages[first][1]["WATCHDOG"] == "1"
            assert len(simulator.requests) >= 1, "the ping came before the API answered anything"
            assert first > ready
            daemon.wait_polls(2)
            notify.wait_for(
                lambda m: m.get("STATUS", "").startswith("last poll ") and "never" not in m["STATUS"],
                10,
                "a STATUS naming the last poll",
            )
            notify.wait_for(lambda m: "WATCHDOG" in m and notify.count("WATCHDOG", first) >= 4, 10, "steady pings")
            pings = [t for t, m in notify.messages[first:] if "WATCHDOG" in m]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert max(gaps) < WATCHDOG_USEC / 1e6, f"systemd would have aborted: gaps {gaps}"

            assert daemon.stop() == 0, daemon.log()[-2000:]
            stopping = notify.wait_for(lambda m: "STOPPING" in m, 5, "STOPPING=1")
            assert notify.messages[stopping][1]["STOPPING"] == "1"
    finally:
        notify.close()
    assert '"stopped"' in daemon.log()


# --- the watchdog's verdict -----------------------------------------------------------------


def _live(**overrides: Any) -> Liveness:
    live = Liveness(started=0.0, intervals={"leads": 60.0, "campaigns": 300.0}, stall_limit=420.0)
    for key, value in overrides.items():
        setattr(live, key, value)
    return live


@pytest.mark.parametrize(
    ("live", "now", "problem"),
    [
        (_live(), 5.0, "no poll has made progress yet"),
        (_live(progressed=True, finished={"leads": 10.0, "campaigns": 10.0}), 400.0, None),
        # Between polls nothing happens for longer than a ping period: that is no stall.
        (_live(progressed=True, finished={"leads": 100.0, "campaigns": 100.0}), 500.0, None),
        # A long walk that keeps getting answers is alive however long it takes.
        (_live(progressed=True, running={"leads": 5000.0}, finished={"campaigns": 4990.0}), 5100.0, None),
        (_live(progressed=True, running={"leads": 100.0}, finished={"campaigns": 500.0}), 521.0, "leads poll: no API"),
        # The scheduler stopped firing: the job has not run for far more than its interval.
        (_live(progressed=True, finished={"leads": 10.0, "campaigns": 700.0}), 491.0, "leads poll: not run"),
        (_live(progressed=True, finished={"leads": 0.0, "campaigns": 0.0}, dispatcher_limit=60.0), 50.0, None),
        (
            _live(
                progressed=True,
                finished={"leads": 100.0, "campaigns": 100.0},
                dispatcher_limit=60.0,
                dispatcher_tick=30.0,
            ),
            100.0,
            "delivery loop: no pass",
        ),
    ],
)
def test_liveness_verdict(live: Liveness, now: float, problem: str | None) -> None:
    """Pings are withheld before progress, and when a poll hangs, stops being scheduled, or delivery stalls."""
    verdict = liveness_problem(live, now)
    if problem is None:
        assert verdict is None
    else:
        assert verdict is not None and verdict.startswith(problem), verdict


def test_watchdog_pings_stop_when_a_poll_hangs_and_resume_after(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer]
) -> None:
    """A poll stuck on a request that never returns stops the pings (and says so); they resume when it moves."""
    _simulator, server = sim
    config = load_config(write_config(tmp_path, server.url))
    hang, release = asyncio.Event(), asyncio.Event()

    async def scenario() -> None:
        upstream = httpx.AsyncClient()

        async def handler(request: httpx.Request) -> httpx.Response:
            # A request that ignores every timeout: only a transport can hang like this.
            if hang.is_set():
                await release.wait()
            body = await request.aread()
            answer = await upstream.request(request.method, str(request.url), headers=request.headers, content=body)
            return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(tmp_path / "wd.sock"))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        seen: list[str] = []

        async def until(predicate: Callable[[str], bool], timeout: float, what: str) -> None:
            async with asyncio.timeout(timeout):
                while True:
                    message = (await loop.sock_recv(sock, 4096)).decode()
                    seen.append(message)
                    if predicate(message):
                        return
            raise AssertionError(what)

        notifier = Notifier(str(tmp_path / "wd.sock"), watchdog_usec=400_000)  # pings every 0.18 s
        try:
            async with runtime(config, SystemClock(), api_transport=httpx.MockTransport(handler), stall=1.0) as rt:
                task = asyncio.create_task(InProcessDaemon(rt, notifier).run())
                await until(lambda m: m == "WATCHDOG=1", 10, "a first ping")
                hang.set()
                await until(lambda m: m.startswith("STATUS=stalled: leads poll"), 10, "the stall reported")
                after_stall = len(seen)
                with pytest.raises(TimeoutError):
                    await until(lambda m: m == "WATCHDOG=1", 1.0, "")
                assert "WATCHDOG=1" not in seen[after_stall:]
                hang.clear()
                release.set()
                await until(lambda m: m == "WATCHDOG=1", 10, "pings resuming")
                rt.stopping.set()
                assert await task == 0
        finally:
            sock.close()
            await upstream.aclose()

    asyncio.run(scenario())


# --- metrics and health ---------------------------------------------------------------------


def _metrics_port(daemon: Daemon) -> int:
    def port() -> int | None:
        for line in daemon.log().splitlines():
            if "metrics endpoint listening" in line:
                return int(json.loads(line)["port"])
        return None

    found: int = wait_until(port, 20, "the metrics endpoint")
    return found


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = _get(port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_count_what_happened_and_healthz_turns_503(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer]
) -> None:
    """/metrics counts polls, API answers, events, deliveries and backlog; /healthz turns 503 without the API."""
    simulator, server = sim
    with Receiver() as good, Receiver() as bad:
        bad.respond(500)
        config = write_config(
            tmp_path,
            server.url,
            [webhook_sink(good.url, "crm"), webhook_sink(bad.url, "broken", retry_schedule=["1h"])],
            leads={"updates": True},
            campaigns={"enabled": True, "interval": 1},
            extra='\n[metrics]\nlisten = "127.0.0.1:0"\n',
        )
        with Daemon(config) as daemon:
            port = _metrics_port(daemon)
            daemon.wait_polls(1)
            simulator.faults.retry_after = 0.1
            simulator.faults.rate_limit_429 = 1
            campaign = simulator.campaign_ids()[0]
            new = simulator.add_leads(3, campaign)
            good.wait_for(lambda reqs: len(reqs) >= 3, 20, "three deliveries")
            assert sorted(e["data"]["lead"]["id"] for e in good.verified_events(WEBHOOK_KEY)) == sorted(new)

            def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
                s = _samples(port)
                ready = (
                    _value(s, "watcher_deliveries_total", sink="crm", outcome="success") == 3
                    and _value(s, "watcher_deliveries_total", sink="broken", outcome="retry") == 3
                    and _value(s, "watcher_outbox_pending", sink="broken") == 3
                    and _value(s, "watcher_outbox_pending", sink="crm") == 0
                )
                return s if ready else None

            s = wait_until(settled, 20, "deliveries and backlog counted")
            assert _value(s, "watcher_events_detected_total", type="lead.created") == 3
            for stream in STREAMS:
                assert _value(s, "watcher_poll_runs_total", stream=stream, outcome="ok") >= 1, stream
                assert _value(s, "watcher_last_successful_poll_timestamp_seconds", stream=stream) > 0, stream
            assert _total(s, "watcher_api_requests_total", code_class="2xx") >= 3
            assert _total(s, "watcher_api_requests_total", code_class="4xx") >= 1, "the 429 was not counted"
            assert _value(s, "watcher_outbox_oldest_pending_age_seconds", sink="broken") >= 0
            assert _value(s, "watcher_deliveries_total", sink="crm", outcome="dead") == 0

            assert _get(port, "/healthz") == (200, "ok\n")
            server.stop()
            _status, reason = wait_until(
                lambda: (r := _get(port, "/healthz"))[0] == 503 and r, 20, "/healthz to turn 503"
            )
            # Whichever stream last succeeded longest ago crosses its limit first (campaigns poll
            # every second here, leads on their own interval): the reason names a stalled stream.
            assert any(f"{stream}: last successful poll" in reason for stream in STREAMS), reason
            # Every enabled stream is judged: the others cross their limit moments later.
            wait_until(
                lambda: all(f"{s}: last successful poll" in _get(port, "/healthz")[1] for s in STREAMS),
                10,
                "every stream named in /healthz",
            )
            # SIGTERM while polls are retrying against the dead API: a clean, quiet stop.
            assert daemon.stop() == 0, daemon.log()[-3000:]
        assert "raised an exception" not in daemon.log() and "Traceback" not in daemon.log()


def test_health_judges_every_enabled_stream(tmp_path: Path) -> None:
    """leads.updated (or its re-read fallback) and campaigns are judged next to leads.created."""
    config = load_config(
        write_config(
            tmp_path, "http://127.0.0.1:9", leads={"updates": True, "interval": 60}, campaigns={"enabled": True}
        )
    )
    assert health_intervals(config, None) == {"leads.created": 60, "campaigns": 300}
    assert health_intervals(config, True) == {"leads.created": 60, "leads.updated": 60, "campaigns": 300}
    assert health_intervals(config, False) == {"leads.created": 60, "leads.recheck": 900 + 60, "campaigns": 300}
    quiet = replace(config, leads=replace(config.leads, quiet_edits=True))
    assert health_intervals(quiet, True) == {
        "leads.created": 60,
        "leads.updated": 60,
        "leads.recheck": 900 + 60,
        "campaigns": 300,
    }
