"""The suite's log capture, and the log-secrets scan run after every other test, also under pytest-xdist.

Every pytest process (the xdist controller, each worker, or the one process of a plain run) appends
the lines it and its subprocesses render to a file of its own in one folder for the run: the first
process makes the folder and names it in CAPTURE_DIR_ENV, which xdist workers inherit. A file per
process, not one shared file: a long line is written in pieces and two writers could interleave them.

`tests/test_zz_log_secrets.py` reads all of them. A plain run collects it last, so it runs last. Under
xdist no test runs "last" on its own: a worker could reach it while others still log. So workers
leave its tests out (reported as deselected) and the controller runs those same test functions once
every worker has finished, reporting them as ordinary test results.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from _pytest.reports import TestReport

from watcher.logs import LOG_CAPTURE_ENV

CAPTURE_DIR_ENV = "WATCHER_TEST_LOG_DIR"
SCAN_FILE = "tests/test_zz_log_secrets.py"

if CAPTURE_DIR_ENV not in os.environ:
    os.environ[CAPTURE_DIR_ENV] = tempfile.mkdtemp(prefix="watcher-logs-")
CAPTURE_DIR = Path(os.environ[CAPTURE_DIR_ENV])
os.environ[LOG_CAPTURE_ENV] = str(CAPTURE_DIR / f"lines-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl")

# (xdist controller) the scan's tests the workers left out: (node id, function name).
_SCAN_DEFERRED = pytest.StashKey[list[tuple[str, str]]]()


def captured_text() -> str:
    """Every line captured so far in this run, from every pytest process and its subprocesses."""
    return "".join(path.read_text() for path in sorted(CAPTURE_DIR.glob("lines-*.jsonl")))


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _is_worker(config):
        return
    scan = [item for item in items if item.nodeid.startswith(SCAN_FILE + "::")]
    if scan:
        items[:] = [item for item in items if item not in scan]
        config.hook.pytest_deselected(items=scan)
        config.workeroutput["log_scan"] = [(item.nodeid, item.name) for item in scan]  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """(xdist controller) A worker that left the scan's tests out hands them over."""
    scan = getattr(node, "workeroutput", {}).get("log_scan")
    if scan:
        node.config.stash[_SCAN_DEFERRED] = scan


def pytest_sessionfinish(session: pytest.Session) -> None:
    """(xdist controller) Run the scan's tests now that no worker logs any more."""
    scan = session.config.stash.get(_SCAN_DEFERRED, None)
    if not scan or session.shouldstop:
        return
    import tests.test_zz_log_secrets as module

    failed = False
    for nodeid, name in scan:
        start = time.time()
        try:
            getattr(module, name)()
            outcome, longrepr = "passed", None
        except Exception:
            outcome, longrepr = "failed", traceback.format_exc()
            failed = True
        stop = time.time()
        report = TestReport(
            nodeid,
            (SCAN_FILE, None, name),
            {},
            outcome,
            longrepr,
            "call",
            duration=stop - start,
            start=start,
            stop=stop,
        )
        session.config.hook.pytest_runtest_logreport(report=report)
    if failed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
