"""The Convertr client on httpx's own transport: read-ahead on the wire in time, proxies, broken answers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.scripted import Scripted, answer
from tests.test_convertr import SIM_PASSWORD, SIM_USER, run, sim_config
from watcher.clock import FakeClock
from watcher.convertr import ConvertrClient
from watcher.errors import TransientError
from watcher.pager import Pager
from watcher.simulator import Simulator, SimulatorServer
from watcher.simulator.filters import LeadQuery, Page


class Announcing(Simulator):
    """A simulator that marks each lead page number as soon as a request for it arrives."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.asked: dict[int, threading.Event] = {}

    def arrived(self, number: int) -> threading.Event:
        return self.asked.setdefault(number, threading.Event())

    def lead_page(self, query: LeadQuery, page: Page) -> tuple[int, list[str]]:
        if page.limit > 1:  # a walk's page, not its one-row position check
            self.arrived(page.number).set()
        return super().lead_page(query, page)


@pytest.fixture
def announcing() -> Iterator[tuple[Announcing, str]]:
    sim = Announcing(seed=21, username=SIM_USER, password=SIM_PASSWORD, clock=FakeClock())
    sim.add_leads(40)
    with SimulatorServer(sim, port=0) as server:
        yield sim, server.url


def test_a_walk_has_the_next_page_on_the_wire_before_handing_over_the_page_in_hand(
    announcing: tuple[Announcing, str],
) -> None:
    """While the caller works on page N without yielding to the loop, the server already has the request for N+1."""
    sim, url = announcing
    handed: list[int] = []

    async def go() -> None:
        async with ConvertrClient(sim_config(url, items_per_page=10), clock=FakeClock()) as client:
            pager = Pager(client, "leads", {"order[id]": "asc"}, 10)
            async for read in pager.pages():
                number = read.page.number
                handed.append(number)
                if number < 4:
                    # Blocks the thread, and so the loop: only a request already written can arrive.
                    assert sim.arrived(number + 1).wait(5), (
                        f"page {number + 1} was not asked for while {number} was in hand"
                    )

    run(go())
    assert handed == [1, 2, 3, 4]


def test_a_campaign_walk_reads_ahead_in_time_too(announcing: tuple[Announcing, str]) -> None:
    """ConvertrClient.pages (campaigns, and any walk without a Pager) puts the next page on the wire before yielding."""
    sim, url = announcing

    async def go() -> list[int]:
        numbers = []
        async with ConvertrClient(sim_config(url, items_per_page=10), clock=FakeClock()) as client:
            async for page in client.pages("leads", {"order[id]": "asc"}):
                numbers.append(page.number)
                if page.number < 4:
                    assert sim.arrived(page.number + 1).wait(5), f"page {page.number + 1} not asked for in time"
        return numbers

    assert run(go()) == [1, 2, 3, 4]


LOGIN = b'{"access_token": "tok", "token_type": "Bearer", "expires_in": 3600}'


def reply(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def test_behind_a_proxy_the_client_goes_through_it(
    scripted: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HTTP_PROXY naming a proxy, the login goes to the proxy in absolute form."""
    proxy = scripted(answer(reply(LOGIN)))
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url.removesuffix("/hook"))
    api = "http://convertr.invalid"

    async def go() -> None:
        async with ConvertrClient(sim_config(api), clock=FakeClock()) as client:
            await client.login()

    run(go())
    [head] = proxy.heads
    assert head.startswith(b"POST http://convertr.invalid/api/login HTTP/1.1")


def test_an_answer_that_is_not_http_is_a_transient_error_without_the_host(scripted: Callable[..., Scripted]) -> None:
    """Garbage where an answer should be: TransientError (retried), whose text names neither host nor port."""
    server = scripted(*[answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")] * 20)
    base = server.url.removesuffix("/hook")

    async def go() -> None:
        async with ConvertrClient(sim_config(base), clock=FakeClock()) as client:
            await client.login()

    with pytest.raises(TransientError) as info:
        run(go())
    assert "127.0.0.1" not in str(info.value)
    assert str(info.value) == "Convertr POST /api/login: the answer is not valid HTTP"
