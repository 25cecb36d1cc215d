"""Suite-wide set-up: every log line any test or subprocess renders is also written to a capture file.

`test_zz_log_secrets.py` scans those files for every secret the suite uses, after every other test
(tests/support/logscan.py: also under pytest-xdist).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.support.daemon import PASSWORD, USERNAME
from tests.support.receiver import Receiver
from tests.support.scripted import Script, Scripted
from watcher.simulator import Simulator, SimulatorServer

# postgres_server / postgres_db: a real PostgreSQL database per test (tests/support/postgres.py);
# backend: the state on SQLite and on PostgreSQL, one test run each (tests/support/backends.py).
# parallel: how pytest-xdist shares the tests out (tests/support/parallel.py); logscan: the capture
# files and the log-secrets scan's place at the end of the run (tests/support/logscan.py).
pytest_plugins = ["tests.support.parallel", "tests.support.logscan", "tests.support.postgres", "tests.support.backends"]


@contextmanager
def serving(seed: int = 11, campaigns: int = 2, leads: int = 10) -> Iterator[tuple[Simulator, SimulatorServer]]:
    """A seeded simulator accepting the suite's login, served on 127.0.0.1."""
    simulator = Simulator(seed=seed, username=USERNAME, password=PASSWORD)
    simulator.seed_data(campaigns=campaigns, leads=leads)
    with SimulatorServer(simulator) as server:
        yield simulator, server


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, SimulatorServer]]:
    """The default simulator; a test module needing other data overrides this fixture."""
    with serving() as pair:
        yield pair


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    """Scripted servers made by the test, closed after it."""
    made: list[Scripted] = []

    def make(*scripts: Script) -> Scripted:
        made.append(Scripted(*scripts))
        return made[-1]

    yield make
    for server in made:
        server.close()
