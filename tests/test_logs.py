from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from watcher.logs import (
    REDACTED,
    add_secrets,
    configure_logging,
    is_pii_key,
    is_sensitive_key,
    known_secrets,
    redact,
    redact_event,
    scrub,
    secret_forms,
)

SECRETS = frozenset({"hunter2-long-password", "s3cr3t/with+chars"})


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("login failed for hunter2-long-password", f"login failed for {REDACTED}"),
        ("no secret here", "no secret here"),
        ("Authorization: Bearer abc.def-ghi", f"Authorization: {REDACTED}"),
        ("sent Bearer abc.def-ghi=", f"sent Bearer {REDACTED}"),
        ("Authorization: Basic dXNlcjpwYXNz", f"Authorization: {REDACTED}"),
        ("authorization failed", "authorization failed"),
        ("GET /api?access_token=abc123&page=2", f"GET /api?access_token={REDACTED}&page=2"),
        ("x?api_key=zzz", f"x?api_key={REDACTED}"),
        ("key whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw used", f"key {REDACTED} used"),
        ("post https://hooks.slack.com/services/T0/B0/XYZ failed", f"post {REDACTED} failed"),
        ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_part", f"token {REDACTED}"),
        ("https://user:pw@api.example.com/x", f"https://{REDACTED}@api.example.com/x"),
        ("lead from jane.doe+x@example.co.uk arrived", f"lead from {REDACTED} arrived"),
        # pii's address pattern: the log's own left "o'" and "Mü" behind and missed accented domains.
        ("from o'brien@example.com", f"from {REDACTED}"),
        ("from Müller@firma.de", f"from {REDACTED}"),
        ("from josé@exämple.de", f"from {REDACTED}"),
        ("campaign Spring Sale went live", "campaign Spring Sale went live"),
        ("https://acme.cvtr.io/api/leads?page=2", "https://acme.cvtr.io/api/leads?page=2"),
    ],
)
def test_scrub(text: str, expected: str) -> None:
    """Known secrets, credential-shaped tokens and e-mail addresses are masked inside any text."""
    assert scrub(text, SECRETS) == expected


@pytest.mark.parametrize(
    ("key", "sensitive"),
    [
        ("password", True),
        ("passwd", True),
        ("access_token", True),
        ("webhook_secret", True),
        ("Authorization", True),
        ("apiKey", True),
        ("x-api-key", True),
        ("webhook-signature", True),
        ("Set-Cookie", True),
        ("stream", False),
        ("url", False),
        ("campaign_name", False),
    ],
)
def test_is_sensitive_key(key: str, sensitive: bool) -> None:
    """Credential keys are recognised whatever their spelling."""
    assert is_sensitive_key(key) is sensitive


@pytest.mark.parametrize(
    ("key", "pii"),
    [
        ("email", True),
        ("telephone", True),
        ("phone", True),
        ("firstName", True),
        ("last_name", True),
        ("postcode", True),
        ("address1", True),
        ("addressLine2", True),
        ("ip", True),
        ("ip_address", True),
        ("leadData.email", True),
        ("leadData.company", False),
        # pii's lists decide, in any spelling: these were missing from the log's own copy.
        ("title", True),
        ("sex", True),
        ("date_of_birth", True),
        ("leadData.name", True),
        ("leaddata.d.o.b", True),
        ("leadData.emailDomain", False),
        # The watcher's own keys: a sink's or campaign's name, the metrics listen address.
        ("name", False),
        ("host", False),
        ("campaign", False),
        ("zip_file", False),
        ("lead_id", False),
    ],
)
def test_is_pii_key(key: str, pii: bool) -> None:
    """Personal lead fields are recognised as pii.py lists them; campaign names and ids are not personal."""
    assert is_pii_key(key) is pii


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"event": "login", "password": "p"}, {"event": "login", "password": REDACTED}),
        ({"event": "x", "token": None, "secret_ok": True}, {"event": "x", "token": None, "secret_ok": True}),
        (
            {"event": "req", "headers": {"Authorization": "Bearer x", "Accept": "json"}},
            {"event": "req", "headers": {"Authorization": REDACTED, "Accept": "json"}},
        ),
        (
            {"event": "lead", "lead": {"id": 7, "email": "a@b.example", "firstName": "Jo", "name": "Spring"}},
            {"event": "lead", "lead": {"id": 7, "email": REDACTED, "firstName": REDACTED, "name": "Spring"}},
        ),
        (
            {"event": "hook", "url": "https://hooks.slack.com/services/A/B/C"},
            {"event": "hook", "url": REDACTED},
        ),
        (
            {"event": "hook", "sink_url": "https://crm.example/s3cr3t/with+chars"},
            {"event": "hook", "sink_url": REDACTED},
        ),
        (
            {"event": "get", "url": "https://acme.cvtr.io/api/leads"},
            {"event": "get", "url": "https://acme.cvtr.io/api/leads"},
        ),
        (
            {"event": "boom hunter2-long-password", "n": 3, "items": ["ok", "hunter2-long-password"]},
            {"event": f"boom {REDACTED}", "n": 3, "items": ["ok", REDACTED]},
        ),
        (
            {"event": "e", "error": ValueError("bad hunter2-long-password")},
            {"event": "e", "error": f"ValueError: bad {REDACTED}"},
        ),
        (
            {"event": "e", "_record": "kept as is hunter2-long-password"},
            {"event": "e", "_record": "kept as is hunter2-long-password"},
        ),
    ],
)
def test_redact_event(event: dict[str, Any], expected: dict[str, Any]) -> None:
    """The pure processor masks by key, by known secret value and by shape, leaving the rest alone."""
    before = json.dumps(event, default=str)
    assert redact_event(event, SECRETS) == expected
    assert json.dumps(event, default=str) == before, "the input dict must not be modified"


def test_secret_forms_cover_encoded_spellings() -> None:
    """URL- and JSON-encoded spellings of a secret are masked too; tiny values are ignored."""
    forms = secret_forms('p@ss w"rd+1')
    assert {'p@ss w"rd+1', "p%40ss%20w%22rd%2B1", "p%40ss+w%22rd%2B1", 'p@ss w\\"rd+1'} <= forms
    assert "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" in secret_forms("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert secret_forms("abc") == set()
    assert secret_forms("   ") == set()


def test_redact_processor_uses_registered_secrets() -> None:
    """`add_secrets` extends what the structlog processor masks."""
    add_secrets(["registered-later-value"])
    assert "registered-later-value" in known_secrets()
    out = redact(None, "info", {"event": "saw registered-later-value"})
    assert out == {"event": f"saw {REDACTED}"}


def configure_json(secrets: tuple[str, ...] = (), capture: str | None = None) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level="debug", fmt="auto", secrets=secrets, stream=stream, capture=capture)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_pipeline_renders_json_lines_for_structlog_and_stdlib() -> None:
    """A non-terminal stream gets one JSON object per line from both structlog and logging."""
    stream = configure_json()
    structlog.get_logger("watcher.test").info("poll finished", stream="leads", fetched=3)
    logging.getLogger("aiohttp.client").warning("job %s missed", "leads")
    first, second = lines(stream)
    assert first["event"] == "poll finished"
    assert first["level"] == "info"
    assert first["fetched"] == 3
    assert first["logger"] == "watcher.test"
    assert first["timestamp"].endswith("Z")
    assert second == {
        **second,
        "event": "job leads missed",
        "level": "warning",
        "logger": "aiohttp.client",
    }


def test_pipeline_masks_secrets_in_tracebacks_and_stdlib_records() -> None:
    """Secrets passed to configure_logging never reach the output, even inside an exception."""
    stream = configure_json(secrets=("pipeline-secret-value",))
    log = structlog.get_logger("watcher.test")
    try:
        raise RuntimeError("login with pipeline-secret-value refused")
    except RuntimeError:
        log.exception("login failed", password="pipeline-secret-value")
    logging.getLogger("httpx").error("POST https://hooks.slack.com/services/T/B/C -> 500")
    text = stream.getvalue()
    assert "pipeline-secret-value" not in text
    assert "hooks.slack.com" not in text
    first, second = lines(stream)
    assert "RuntimeError: login with [REDACTED] refused" in first["exception"]
    assert first["password"] == REDACTED
    assert second["event"] == f"POST {REDACTED} -> 500"


def test_noisy_libraries_stay_at_warning() -> None:
    """httpx/httpcore INFO lines (full URLs) and their DEBUG wire chatter are dropped."""
    stream = configure_json()
    configure_logging(level="info", stream=stream)
    logging.getLogger("httpx").info("HTTP Request: GET https://acme.cvtr.io/api/leads")
    logging.getLogger("httpcore.connection").debug("connect_tcp.started")
    structlog.get_logger("watcher.test").debug("hidden at info")
    structlog.get_logger("watcher.test").info("shown")
    assert [line["event"] for line in lines(stream)] == ["shown"]


def test_console_format_on_request() -> None:
    """fmt="console" renders human lines, still redacted."""
    stream = io.StringIO()
    configure_logging(fmt="console", secrets=["console-secret-value"], stream=stream)
    structlog.get_logger("watcher.test").info("hello", detail="console-secret-value")
    text = stream.getvalue()
    assert "hello" in text
    assert "console-secret-value" not in text
    assert REDACTED in text


def test_reconfiguring_replaces_the_previous_handler() -> None:
    """A second configure_logging writes to the new stream only."""
    old = configure_json()
    new = configure_json()
    structlog.get_logger("watcher.test").info("once")
    assert old.getvalue() == ""
    assert [line["event"] for line in lines(new)] == ["once"]


def test_capture_file_receives_every_line(tmp_path: Path) -> None:
    """With WATCHER_LOG_CAPTURE set, each rendered line is also appended to that file."""
    capture = tmp_path / "capture.jsonl"
    capture.write_text('{"event": "earlier process"}\n')
    stream = configure_json(secrets=("capture-secret-value",), capture=str(capture))
    structlog.get_logger("watcher.test").warning("saw capture-secret-value")
    logging.getLogger("aiohttp.client").error("boom")
    for handler in logging.getLogger().handlers:
        handler.flush()
    captured = [json.loads(line) for line in capture.read_text().splitlines()]
    assert [c["event"] for c in captured] == ["earlier process", f"saw {REDACTED}", "boom"]
    assert [line["event"] for line in lines(stream)] == [f"saw {REDACTED}", "boom"]


@pytest.mark.parametrize(("level", "fmt"), [("loud", "auto"), ("critical", "auto"), ("info", "xml")])
def test_bad_level_or_format_is_refused(level: str, fmt: str) -> None:
    """Unknown levels and formats raise ValueError before anything is reconfigured."""
    with pytest.raises(ValueError):
        configure_logging(level=level, fmt=fmt, stream=io.StringIO())
