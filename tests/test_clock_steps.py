"""The host's wall clock steps (NTP, a VM restore) under a running daemon: polling and delivery carry on.

The daemon runs under libfaketime (Debian's `faketime` package): its wall clock follows an offset
read from FAKETIME_TIMESTAMP_FILE on every call, which the test rewrites mid-run, while its
monotonic clock is left real. The simulator and the receiver run in this process on real time.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.daemon import WEBHOOK_KEY, Daemon, wait_until, webhook_sink, write_config
from tests.support.faketime import faketime_env
from tests.support.receiver import Receiver, verify_request
from watcher import clockframe
from watcher.clock import FakeClock, SteppedClock


def _stepping(tmp_path: Path, api_url: str, sink: dict[str, object]) -> tuple[Daemon, Path]:
    """A daemon (not started) whose wall clock is offset by what the returned file says (now "+0")."""
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    config = write_config(tmp_path, api_url, [sink])
    return Daemon(config, env=faketime_env(offset)), offset


def _created(receiver: Receiver) -> set[int]:
    """Leads whose lead.created a receiver accepted (answered 200), signatures checked."""
    events = [verify_request(r, WEBHOOK_KEY, check_timestamp=False) for r in receiver.requests if r.status == 200]
    return {e["data"]["lead"]["id"] for e in events if e["type"] == "lead.created"}


def _log_events(daemon: Daemon) -> list[dict[str, object]]:
    out = []
    for line in daemon.log().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_wall_clock_steps_neither_stop_nor_delay_polling_or_waiting_retries(
    tmp_path: Path, sim, receiver: Receiver
) -> None:
    """The clock goes back an hour, then forward three: leads created after each step are delivered within a few
    1 s polls, and a retry waiting 2 s when the clock went back is sent within seconds, not in an hour."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    daemon, offset = _stepping(tmp_path, server.url, webhook_sink(receiver.url, retry_schedule=["2s"] * 5))
    with daemon:
        daemon.wait_polls(2)
        receiver.respond(500)
        waiting = set(simulator.add_leads(1, campaign))
        # The outcome written (its retry time on the old clock) before the step.
        wait_until(lambda: "delivery failed" in daemon.log(), 20, "the failed attempt recorded")
        receiver.respond(200)
        offset.write_text("-3600\n")
        after_back = set(simulator.add_leads(2, campaign))
        # Polls run every second: a scheduler on the wall clock would wait out the whole step.
        wait_until(lambda: waiting | after_back <= _created(receiver), 15, "the retry and the leads after the step")
        offset.write_text("+7200\n")
        after_forward = set(simulator.add_leads(2, campaign))
        wait_until(lambda: after_forward <= _created(receiver), 15, "leads created after the forward step")
        daemon.wait_polls(2, timeout=10)
        assert daemon.stop() == 0
    lines = _log_events(daemon)
    assert not [e for e in lines if e.get("level") == "error"], daemon.log()[-3000:]
    steps = [e["seconds"] for e in lines if str(e.get("event")).startswith("the host clock stepped")]
    assert [round(float(str(s)) / 60) for s in steps] == [-60, 180], steps


def test_a_forward_step_raises_no_false_failing_alert(tmp_path: Path, sim, receiver: Receiver) -> None:
    """A sink failing for seconds is not reported as failing for hours when the clock jumps two hours ahead."""
    simulator, server = sim
    daemon, offset = _stepping(tmp_path, server.url, webhook_sink(receiver.url, retry_schedule=["200ms"] * 200))
    with daemon:
        daemon.wait_polls(2)
        receiver.respond(500)
        simulator.add_leads(1, simulator.campaign_ids()[0])
        receiver.wait_for(lambda reqs: len([r for r in reqs if r.status == 500]) >= 2, timeout=20)
        offset.write_text("+7200\n")
        failed = len(receiver.requests)
        # Several more failed attempts after the step: each one is where the alert would be raised.
        receiver.wait_for(lambda reqs: len(reqs) >= failed + 4, timeout=20)
        receiver.respond(200)
        assert daemon.stop() == 0
    assert "sink failing without a success" not in daemon.log(), daemon.log()[-3000:]
    assert "the host clock stepped" in daemon.log()


def test_stepped_clock_reports_each_step_once() -> None:
    """Steps either way are reported once, before the new time is handed out; slow drift is not a step."""
    inner = FakeClock()
    clock = SteppedClock(inner)
    steps: list[float] = []
    clock.on_step = steps.append
    inner.advance(5.0)
    clock.now()
    inner.t -= 3600.0
    assert clock.now() == inner.t
    inner.advance(1.0)
    clock.now()
    inner.t += 7200.0
    clock.now()
    for _ in range(10):
        inner.t += 0.5  # wall 0.5 s ahead of elapsed per reading: drift, never one step
        clock.now()
    assert steps == [-3600.0, 7200.0]


def test_a_step_back_while_the_daemon_is_stopped_does_not_hold_a_waiting_retry(
    tmp_path: Path, sim, receiver: Receiver
) -> None:
    """The daemon stops with a retry due in seconds; the clock goes back an hour before it starts again
    (an NTP step at boot of the service, a VM restored): the retry is sent within seconds, not in an hour."""
    simulator, server = sim
    daemon, offset = _stepping(tmp_path, server.url, webhook_sink(receiver.url, retry_schedule=["3s"] * 5))
    with daemon:
        daemon.wait_polls(2)
        receiver.respond(500)
        waiting = set(simulator.add_leads(1, simulator.campaign_ids()[0]))
        wait_until(lambda: "delivery failed" in daemon.log(), 20, "the failed attempt recorded")
        assert daemon.stop() == 0
    receiver.respond(200)
    offset.write_text("-3600\n")
    with daemon:
        wait_until(lambda: waiting <= _created(receiver), 20, "the retry after the step")
        assert daemon.stop() == 0
    assert "the host clock stepped while the daemon was stopped" in daemon.log()


def test_the_clock_frame_tells_a_step_only_within_one_boot(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    assert clockframe.step_while_stopped(state, "boot-a", 1000.0) == 0.0  # nothing kept yet
    clockframe.keep(state, "boot-a", 1000.0)
    assert clockframe.step_while_stopped(state, "boot-a", 1000.4) == 0.0  # within tolerance: no step
    assert clockframe.step_while_stopped(state, "boot-a", -2600.0) == -3600.0
    assert clockframe.step_while_stopped(state, "boot-b", -2600.0) == 0.0  # rebooted: cannot tell
    assert clockframe.step_while_stopped(state, None, -2600.0) == 0.0
