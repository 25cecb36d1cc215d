"""The README's receiver snippet runs as printed and accepts what the daemon sends."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tests.support.daemon import WEBHOOK_KEY
from watcher import __version__
from watcher.events import Event, event_id
from watcher.signing import decode_secret, webhook_headers

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    [snippet] = [b for b in blocks if "standardwebhooks" in b and "def handle(" in b]
    return snippet.replace('"whsec_…"', repr(WEBHOOK_KEY))


def test_receiver_snippet_verifies_a_signed_request_and_rejects_a_tampered_one() -> None:
    """The snippet's handle() answers 204 to a request signed like the daemon's, 400 to a changed body."""
    processed: list[tuple[str, Any]] = []
    namespace: dict[str, Any] = {
        "already_processed": lambda _id: False,
        "process": lambda type_, data: processed.append((type_, data)),
    }
    exec(compile(_snippet(), str(README), "exec"), namespace)
    event = Event(
        event_id("lead.created", "lead:1", ""),
        "lead.created",
        "2026-01-01T00:00:00.000Z",
        {"lead": {"id": 1}},
        "lead:1",
    )
    body = event.body()
    headers = webhook_headers(event.id, int(time.time()), body, [decode_secret(WEBHOOK_KEY)], __version__)
    assert namespace["handle"](body, headers) == 204
    assert processed == [("lead.created", {"lead": {"id": 1}})]
    assert namespace["handle"](body.replace(b'"id":1', b'"id":2'), headers) == 400
