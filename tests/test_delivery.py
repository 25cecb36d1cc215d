"""Delivery end to end: simulator → the real CLI (run, once, status, replay, send-test) → loopback receivers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import (
    WEBHOOK_KEY,
    WEBHOOK_KEY_2,
    Daemon,
    cli,
    wait_until,
    webhook_sink,
    write_config,
)
from tests.support.receiver import Receiver, Reply, Request
from tests.support.state import reading
from watcher.simulator import Simulator, SimulatorServer


def events(daemon: Daemon) -> list[tuple[str, str, str]]:
    """(event id, resource, type) of every detected event, in detection order."""
    return [(e["id"], e["resource"], e["type"]) for e in daemon.read(lambda store: store.events(), [])]


def detected_count(daemon: Daemon, n: int) -> Callable[[], bool]:
    return lambda: len(events(daemon)) == n


def deliveries(daemon: Daemon, sink: str = "crm") -> dict[str, dict[str, Any]]:
    rows = daemon.read(lambda store: store.deliveries(sink), [])
    return {
        r["event_id"]: {"status": r["status"], "attempts": r["attempts"], "next_attempt_at": r["next_attempt_at"]}
        for r in rows
    }


def all_delivered(daemon: Daemon, n: int, sink: str = "crm") -> bool:
    rows = deliveries(daemon, sink)
    return len(rows) == n and all(r["status"] == "delivered" for r in rows.values())


def status(config: Path) -> dict[str, Any]:
    result = cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return {s["sink"]: s for s in json.loads(result.stdout)["sinks"]}


def order_kept(requests: Sequence[Request], detected: Sequence[tuple[str, str, str]]) -> bool:
    """No request for an event arrives after a request for a later event about the same resource."""
    seq = {eid: i for i, (eid, _res, _type) in enumerate(detected)}
    resource = {eid: res for eid, res, _type in detected}
    last: dict[str, int] = {}
    for r in requests:
        eid = r.headers["webhook-id"]
        if seq[eid] < last.get(resource[eid], -1):
            return False
        last[resource[eid]] = seq[eid]
    return True


def accepted(receiver: Receiver) -> list[str]:
    return [r.headers["webhook-id"] for r in receiver.requests if r.status is not None and 200 <= r.status < 300]


def test_outage_keeps_order_and_ids_and_the_schedule_survives_a_restart(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """Through a 500 outage and a restart mid-backoff, every event arrives once accepted, in order per lead."""
    simulator, server = sim
    receiver.respond(500)
    config = write_config(
        tmp_path, server.url, [webhook_sink(receiver.url, retry_schedule=["2s"] * 30)], leads={"updates": True}
    )
    campaign = simulator.campaign_ids()[0]
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        leads = [simulator.add_lead(campaign)["id"] for _ in range(2)]
        wait_until(lambda: len(events(daemon)) == 2, 15, "two lead.created")
        for want, step in ((4, 0), (6, 1)):
            for i, lead in enumerate(leads):
                simulator.update_lead(lead, score=1000 + 10 * step + i)  # no generated lead scores this
            wait_until(detected_count(daemon, want), 15, "lead.updated detected")
        heads = [eid for eid, _r, type_ in events(daemon) if type_ == "lead.created"]
        receiver.wait_for(lambda reqs: {r.headers["webhook-id"] for r in reqs} >= set(heads), 10, "both heads tried")
        stopped_at = time.time()
        assert daemon.stop() == 0
    detected = events(daemon)
    before = deliveries(daemon)
    assert [t for _i, _r, t in detected] == ["lead.created"] * 2 + ["lead.updated"] * 4
    assert all(d["status"] == "pending" for d in before.values())
    assert all(before[h]["attempts"] >= 1 for h in heads)
    assert any(before[h]["next_attempt_at"] > stopped_at for h in heads), "stopped in the middle of a backoff"
    assert all(d["attempts"] == 0 for eid, d in before.items() if eid not in heads), "later events waited"
    tried_before = len(receiver.requests)

    receiver.respond(200)
    with Daemon(config) as daemon:
        wait_until(lambda: all_delivered(daemon, 6), 20, "everything delivered after the restart")
        assert daemon.stop() == 0
    # The schedule was resumed, not restarted: each head's next attempt waited for its stored time.
    with reading(daemon.state) as store:
        log = store.attempts()
    for head in heads:
        resumed = [row for row in log if row["event_id"] == head][before[head]["attempts"]]
        assert resumed["attempt"] == before[head]["attempts"] + 1
        assert resumed["at"] >= before[head]["next_attempt_at"]
    # The attempt log has one row per request, numbered from 1 per event across the restart.
    assert len(log) == len(receiver.requests)
    for eid, *_ in detected:
        tries = [row for row in log if row["event_id"] == eid]
        assert [row["attempt"] for row in tries] == list(range(1, len(tries) + 1))
        assert [row["status_code"] for row in tries] == [500] * (len(tries) - 1) + [200]
        assert all(row["error"] for row in tries[:-1]) and tries[-1]["error"] is None
    assert sorted(accepted(receiver)) == sorted(eid for eid, *_ in detected), "each event accepted exactly once"
    assert order_kept(receiver.requests, detected)
    assert order_kept(receiver.requests[tried_before:], detected)
    for lead in leads:
        mine = [eid for eid, res, _t in detected if res == f"lead:{lead}"]
        assert [i for i in accepted(receiver) if i in mine] == mine, "per-lead order is detection order"
    bodies = receiver.verified_events(WEBHOOK_KEY)
    assert {b["type"] for b in bodies} == {"lead.created", "lead.updated"}


def test_retry_after_is_honoured(tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver) -> None:
    """A 429 with Retry-After: 2 keeps the next attempt away for at least two seconds (schedule says 250 ms)."""
    simulator, server = sim
    receiver.respond_sequence([Reply(429, headers={"retry-after": "2"})])
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url, retry_schedule=["250ms"] * 5)])
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        simulator.add_leads(1, simulator.campaign_ids()[0])
        first, second = receiver.wait_for(lambda reqs: len(reqs) >= 2 and reqs[1].status is not None, 15)[:2]
        assert daemon.stop() == 0
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert (first.status, second.status) == (429, 200)
    assert second.received_at - first.received_at >= 2.0


def test_410_disables_the_sink_and_replay_sends_the_backlog_in_order(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """410 disables the sink (status shows it) and keeps every event; `replay --sink` sends them all in order."""
    simulator, server = sim
    receiver.respond(410)
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], leads={"updates": True})
    campaign = simulator.campaign_ids()[0]
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        lead = simulator.add_lead(campaign)["id"]
        wait_until(lambda: len(events(daemon)) == 1, 15, "lead.created")
        receiver.wait_for(lambda reqs: any(r.status == 410 for r in reqs), 10, "the 410")
        simulator.update_lead(lead, score=99)
        simulator.add_leads(2, campaign)
        wait_until(lambda: len(events(daemon)) == 4, 15, "the rest detected")
        daemon.wait_polls(1)
        sinks = status(config)
        assert sinks["crm"]["disabled"] is True and "410" in sinks["crm"]["disabled_reason"]
        assert (sinks["crm"]["pending"], sinks["crm"]["dead"]) == (4, 0)
        assert len(receiver.requests) == 1, "no attempts while disabled"
        assert "sink disabled" in daemon.log()

        receiver.respond(204)
        result = cli("replay", "-c", str(config), "--sink", "crm")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: all_delivered(daemon, 4), 15, "the backlog after `replay --sink`")
        assert daemon.stop() == 0
    detected = events(daemon)
    assert sorted(accepted(receiver)) == sorted(eid for eid, *_ in detected)
    assert order_kept(receiver.requests, detected)
    mine = [eid for eid, res, _t in detected if res == f"lead:{lead}"]
    assert [i for i in accepted(receiver) if i in mine] == mine
    after = status(config)["crm"]
    assert (after["disabled"], after["pending"], after["delivered"]) == (False, 0, 4)


def test_changing_a_disabled_sinks_url_enables_it(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """After a 410, pointing the sink at a new URL and restarting delivers the kept events there."""
    simulator, server = sim
    receiver.respond(410)
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)])
    with Daemon(config) as daemon:
        daemon.wait_polls(1)
        ids = simulator.add_leads(3, simulator.campaign_ids()[0])
        wait_until(lambda: daemon.read(lambda store: store.sink_disabled("crm"), False), 15, "sink disabled")
        wait_until(lambda: len(events(daemon)) == 3, 15, "all detected")
        assert daemon.stop() == 0
    with Receiver() as moved:
        write_config(tmp_path, server.url, [webhook_sink(moved.url)])
        with Daemon(config) as daemon:
            wait_until(lambda: all_delivered(daemon, 3), 15, "delivered to the new URL")
            assert daemon.stop() == 0
        got = [e["data"]["lead"]["id"] for e in moved.verified_events(WEBHOOK_KEY)]
    assert sorted(got) == ids
    assert status(config)["crm"]["disabled"] is False


def test_a_hung_sink_never_delays_another(tmp_path: Path, sim: tuple[Simulator, SimulatorServer]) -> None:
    """While one receiver holds every request, the other sink gets each new lead within 3 s."""
    simulator, server = sim
    with Receiver() as hung, Receiver() as healthy:
        hung.hang()
        config = write_config(
            tmp_path,
            server.url,
            [webhook_sink(hung.url, "stuck", timeout="10s"), webhook_sink(healthy.url, "ok")],
        )
        with Daemon(config) as daemon:
            daemon.wait_polls(1)
            created = time.monotonic()
            ids = simulator.add_leads(6, simulator.campaign_ids()[0])
            healthy.wait_for(lambda reqs: len(reqs) >= 6, 3, "every lead at the healthy sink within 3 s")
            assert time.monotonic() - created < 3.0
            held = hung.requests
            assert held and all(r.status is None for r in held), "the other sink is hung all along"
            hung.hang(False)
            wait_until(lambda: all_delivered(daemon, 6, "stuck"), 15, "the hung sink catches up")
            assert daemon.stop() == 0
        assert sorted(e["data"]["lead"]["id"] for e in healthy.verified_events(WEBHOOK_KEY)) == ids


def test_dead_letters_and_replay_by_id_time_and_sink(
    tmp_path: Path, sim: tuple[Simulator, SimulatorServer], receiver: Receiver
) -> None:
    """Exhausted events are dead (status counts them); replay by id, time range and sink resends them, same ids."""
    simulator, server = sim
    campaign = simulator.campaign_ids()[0]
    start = simulator.now().isoformat()
    simulator.advance(5)
    first = simulator.add_leads(3, campaign)
    receiver.respond(500)
    config = write_config(
        tmp_path,
        server.url,
        [webhook_sink(receiver.url, retry_schedule=["100ms"], secret=f"{WEBHOOK_KEY} {WEBHOOK_KEY_2}")],
        leads={"start": start},
    )
    state = Daemon(config)  # only to read the state file

    def once() -> int:
        wait_until(lambda: all(d["next_attempt_at"] <= time.time() for d in deliveries(state).values()), 5, "due")
        return cli("once", "-c", str(config)).returncode

    assert once() == 1  # first batch detected, first attempts fail
    boundary = datetime.now(UTC)  # after the first batch was detected, before the second is
    second = simulator.add_leads(2, campaign)
    assert once() == 1  # first batch dies (schedule used up); second batch tried once
    assert once() == 1  # second batch dies
    rows = deliveries(state)
    assert len(rows) == 5 and {d["status"] for d in rows.values()} == {"dead"}
    assert (status(config)["crm"]["dead"], status(config)["crm"]["pending"]) == (5, 0)
    by_lead = {r.json()["data"]["lead"]["id"]: r.headers["webhook-id"] for r in receiver.requests}
    failed = len(receiver.requests)
    assert failed == 10

    receiver.respond(200)
    replays = [
        (["--event", by_lead[first[0]]], [first[0]]),
        (["--since", boundary.isoformat()], second),
        (["--until", boundary.isoformat(), "--sink", "crm"], first[1:]),
    ]
    for args, leads in replays:
        result = cli("replay", "-c", str(config), *args)
        assert (result.returncode, result.stdout.strip()) == (0, f"re-queued {len(leads)} deliveries"), result.stderr
        assert once() == 0
        sent = receiver.requests[failed:]
        assert sorted(r.json()["data"]["lead"]["id"] for r in sent) == sorted(leads)
        assert all(r.headers["webhook-id"] == by_lead[r.json()["data"]["lead"]["id"]] for r in sent), "same ids"
        failed = len(receiver.requests)
    assert (status(config)["crm"]["dead"], status(config)["crm"]["delivered"]) == (0, 5)
    nothing = cli("replay", "-c", str(config), "--all")
    assert nothing.stdout.strip() == "re-queued 0 deliveries"
    again = cli("replay", "-c", str(config), "--delivered", "--event", by_lead[second[0]])
    assert again.stdout.strip() == "re-queued 1 deliveries"
    assert once() == 0
    assert receiver.requests[-1].headers["webhook-id"] == by_lead[second[0]]
    # Rotation: every request carries both keys' signatures, and either key alone verifies it.
    assert all(len(r.headers["webhook-signature"].split(" ")) == 2 for r in receiver.requests)
    assert len(receiver.verified_events(WEBHOOK_KEY)) == len(receiver.verified_events(WEBHOOK_KEY_2)) == 16


@pytest.mark.parametrize(
    ("answer", "code", "said"), [(200, 0, "accepted: HTTP 200"), (500, 1, "not accepted: HTTP 500")]
)
def test_send_test_prints_the_answer(tmp_path: Path, receiver: Receiver, answer: int, code: int, said: str) -> None:
    """`send-test` sends a signed watcher.test event, prints the answer, and exits 0 only on a 2xx."""
    receiver.respond(answer, b"fine" if answer == 200 else b"")
    config = write_config(tmp_path, "http://127.0.0.1:9", [webhook_sink(receiver.url)])
    result = cli("send-test", "-c", str(config), "--sink", "crm")
    assert result.returncode == code, result.stderr
    assert said in result.stdout and "evt_" in result.stdout
    [event] = receiver.verified_events(WEBHOOK_KEY)
    assert event["type"] == "watcher.test" and event["data"] == {"sink": "crm"}


def test_send_test_to_nobody_exits_1(tmp_path: Path) -> None:
    """A refused connection is reported without the URL, with exit status 1."""
    with Receiver() as gone:
        url = gone.url
    config = write_config(tmp_path, "http://127.0.0.1:9", [webhook_sink(url)])
    result = cli("send-test", "-c", str(config), "--sink", "crm")
    assert result.returncode == 1
    assert "connection refused" in result.stdout and url not in result.stdout + result.stderr
