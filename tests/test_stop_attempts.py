"""An attempt the stop cuts off: the receiver may have read it, so the attempt log shows it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.backends import Backend, state_of
from tests.support.daemon import wait_until
from tests.support.receiver import Receiver
from tests.test_outbox import Running, _event, queue, settled, webhook
from watcher.state.records import DELIVERED, PENDING
from watcher.state.store import Store


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = backend.open()
    yield s
    s.close()


def test_an_attempt_cut_off_by_the_stop_is_a_failed_attempt_and_goes_again(store: Store) -> None:
    """A receiver slower than the stop's grace read the request: that copy is a row in the attempt
    log (failed, naming the stop), the event stays pending without using up a step of its schedule,
    and after the restart every copy the receiver read is one attempt row."""
    with Receiver() as rx:
        rx.respond(200, delay=5.0)
        queue(store, [_event(1)])
        with Running(state_of(store), [webhook(rx.url)], grace=0.3) as first:
            rx.wait_for_count(1)
            first.stop()
        [row] = store.deliveries("crm")
        assert (row["status"], row["attempts"]) == (PENDING, 0)
        [attempt] = store.attempts("crm")
        assert "stopped" in str(attempt["error"])
        rx.respond(204)
        with Running(state_of(store), [webhook(rx.url)]):
            wait_until(lambda: settled(store), 10, "the event delivered after the restart")
        assert [r["status"] for r in store.deliveries("crm")] == [DELIVERED]
        assert len(store.attempts("crm")) == len(rx.requests) == 2
