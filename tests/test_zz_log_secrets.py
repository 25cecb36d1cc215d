"""The log-secrets scan: no line the suite emitted carries a password, token, key or hook URL.

Collected last, so it reads the lines of every earlier test (subprocesses included, through the
capture files set in tests/support/logscan.py). Under pytest-xdist the controller runs these tests
once every worker has finished (tests/support/logscan.py says how).
"""

from __future__ import annotations

import base64
import re

from tests.support.brokers import BROKER_PASSWORD
from tests.support.daemon import PASSWORD, WEBHOOK_KEY, WEBHOOK_KEY_2
from tests.support.logscan import CAPTURE_DIR, captured_text
from tests.support.postgres import PG_PASSWORD


def _forms(secret: str) -> set[str]:
    forms = {secret}
    if secret.startswith("whsec_"):
        forms.add(secret.removeprefix("whsec_"))
        forms.add(base64.b64decode(secret.removeprefix("whsec_")).decode(errors="ignore"))
    return {f for f in forms if len(f) >= 8}


def test_no_secret_in_any_log_line() -> None:
    """Every captured log line is free of the suite's passwords, webhook keys and Slack hook paths."""
    assert any(CAPTURE_DIR.glob("lines-*.jsonl")), "no log line was captured: the capture hook is not wired"
    text = captured_text()
    assert text.count("\n") > 50, "suspiciously few log lines captured"
    secrets = set()
    for secret in (
        PASSWORD,
        WEBHOOK_KEY,
        WEBHOOK_KEY_2,
        BROKER_PASSWORD,
        PG_PASSWORD,
        "T0FAKE000/B0FAKE000/abcdefghijklmnopqrstuvwx",
    ):
        secrets |= _forms(secret)
    leaks = [s for s in secrets if s in text]
    assert leaks == [], f"secrets found in logs: {len(leaks)} distinct values"


def test_no_email_address_in_any_log_line() -> None:
    """No captured log line carries an e-mail address (leads' personal data, or a login name)."""
    text = captured_text()
    found = set(re.findall(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+", text))
    assert found == set(), f"{len(found)} e-mail addresses in logs, e.g. {sorted(found)[:3]}"
