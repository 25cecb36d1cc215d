"""How pytest-xdist hands the suite's tests to its workers (make test runs it with -n).

Test by test, as `--dist load` does, except that a module whose tests share one costly fixture
goes whole to one worker, which then makes that fixture once rather than once per worker.

Not `--dist loadgroup` with xdist_group marks: pytest-xdist 3.8 groups by rewriting each item's
node id, which pytest 9 no longer reads, so the marks are silently ignored.
"""

from __future__ import annotations

from typing import Any

import pytest

# Module -> the fixture its tests share.
WHOLE_MODULES = {
    "tests/test_install.py": "plain_install: a wheel build and a fresh venv with pip install",
    "tests/test_events_cli.py": "history: a daemon run that delivered and dead-lettered events",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in WHOLE_MODULES else nodeid

    return Scheduling(config, log)
