"""Structured logging: JSON lines for journald, a console view on a terminal, secrets and PII masked.

What counts as personal is `watcher.pii`'s to say; this module only applies it to log keys.

structlog and the standard library (httpx, aiohttp, ...) share one pipeline, so every line
passes through `redact` before it is rendered.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import IO, Any
from urllib.parse import quote, quote_plus

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from watcher.pii import EMAIL, is_personal_lead_data, is_personal_name

LOG_CAPTURE_ENV = "WATCHER_LOG_CAPTURE"
REDACTED = "[REDACTED]"
# What `[log] level` and `format` accept (config.py reads them from here). No "critical": the
# daemon says a fatal problem at error level, so it would silence the very line that explains a stop.
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")

# Shorter "secrets" would shred ordinary words out of every line without protecting anything real.
MIN_SECRET_LENGTH = 4

SENSITIVE_KEY = re.compile(r"passw(or)?d|token|secret|authorization|api[-_]?key|signature|cookie", re.I)
# Keys the watcher's own lines use for its own things (a sink's, task's or campaign's name, the
# metrics listen address). pii counts them personal only as a lead's field or leadData entry, and
# no line logs a lead document.
_OWN_KEYS = frozenset({"name", "host"})

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\bBearer\s+[A-Za-z0-9\-._~+/]+=*"), f"Bearer {REDACTED}"),
    # A header dumped as text: "Authorization: Basic ...", "authorization=...".
    (
        re.compile(r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)(?:[a-z]+\s+)?[^\s\"',;}]+"),
        rf"\1{REDACTED}",
    ),
    (
        re.compile(
            r"(?i)\b([\w-]*?(?:token|api[-_]?key|apikey|passw(?:or)?d|secret|signature|sig|key))"
            r"=[^&\s\"'<>]+"
        ),
        rf"\1={REDACTED}",
    ),
    (re.compile(r"whsec_[A-Za-z0-9+/=_-]+"), REDACTED),
    (re.compile(r"https?://hooks\.slack\.com/[^\s\"'<>]*", re.I), REDACTED),
    # JWTs (the Convertr login answers with one).
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # user:password@ in a URL.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s:\"']+:[^/@\s\"']*@"), rf"\1{REDACTED}@"),
    (EMAIL, REDACTED),
)

# Rebound (never mutated) so the compiled pattern cache keys on one object per generation.
_known_secrets: frozenset[str] = frozenset()


def secret_forms(value: str) -> set[str]:
    """The spellings of one secret that can show up in text: raw, URL-encoded and JSON-escaped."""
    value = value.strip()
    if len(value) < MIN_SECRET_LENGTH:
        return set()
    forms = {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}
    if value.startswith("whsec_") and len(value) - 6 >= MIN_SECRET_LENGTH:
        # The key material alone, as a receiver's error message might quote it.
        forms |= secret_forms(value.removeprefix("whsec_"))
    return forms


def add_secrets(values: Iterable[str]) -> None:
    """Mask these values wherever they appear in later log lines."""
    global _known_secrets
    forms = set(_known_secrets)
    for value in values:
        if isinstance(value, str):
            forms |= secret_forms(value)
    _known_secrets = frozenset(forms)


def known_secrets() -> frozenset[str]:
    """Every form of every secret registered so far."""
    return _known_secrets


@lru_cache(maxsize=8)
def _secret_pattern(secrets: frozenset[str]) -> re.Pattern[str] | None:
    if not secrets:
        return None
    # Longest first so a secret containing another is masked whole.
    return re.compile("|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True)))


def scrub(text: str, secrets: frozenset[str] = frozenset()) -> str:
    """`text` with known secrets, credentials-looking tokens and e-mail addresses masked."""
    pattern = _secret_pattern(secrets)
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    for regex, replacement in _PATTERNS:
        text = regex.sub(replacement, text)
    return text


def is_sensitive_key(key: str) -> bool:
    """A key whose value is a credential and is never logged."""
    return SENSITIVE_KEY.search(key) is not None


def is_pii_key(key: str) -> bool:
    """A key holding a person's details, by pii's lists in any spelling: masked, ids are logged instead."""
    # leadData entries arrive as "leadData.<name>" (or "leadData#<id>.<name>"): judge the entry's name.
    prefix, _, entry = key.partition(".")
    if entry and prefix.lower().partition("#")[0] == "leaddata":
        return is_personal_lead_data(entry)
    return key.lower() not in _OWN_KEYS and is_personal_name(key)


def _is_secret_url(value: Any, secrets: frozenset[str]) -> bool:
    if not isinstance(value, str):
        return False
    return "hooks.slack.com" in value.lower() or any(s in value for s in secrets)


def redact_value(value: Any, secrets: frozenset[str] = frozenset()) -> Any:
    """`value` with every string inside it scrubbed and sensitive keys of nested mappings masked."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, bytes | bytearray):
        return scrub(bytes(value).decode("utf-8", "replace"), secrets)
    if isinstance(value, Mapping):
        return {k: _redact_item(str(k), v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v, secrets) for v in value]
    if isinstance(value, BaseException):
        return scrub(f"{type(value).__name__}: {value}", secrets)
    # Anything else would be rendered through repr(), which may carry a secret: render it here.
    return scrub(str(value), secrets)


def _redact_item(key: str, value: Any, secrets: frozenset[str]) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if is_sensitive_key(key) or is_pii_key(key):
        return REDACTED
    if key.lower().endswith("url") and _is_secret_url(value, secrets):
        return REDACTED
    return redact_value(value, secrets)


def redact_event(event_dict: EventDict, secrets: frozenset[str] = frozenset()) -> EventDict:
    """A copy of `event_dict` that is safe to write out; structlog's private keys are left alone."""
    return {
        key: value if key.startswith("_") else _redact_item(key, value, secrets) for key, value in event_dict.items()
    }


def redact(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: `redact_event` against the secrets registered with `add_secrets`."""
    return redact_event(event_dict, known_secrets())


def _level_number(level: str) -> int:
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    return int(getattr(logging, level.upper()))


def _renderer(fmt: str, stream: IO[str]) -> Processor:
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    isatty = getattr(stream, "isatty", None)
    if fmt == "console" or (fmt == "auto" and isatty is not None and isatty()):
        return structlog.dev.ConsoleRenderer(colors=fmt == "auto", exception_formatter=structlog.dev.plain_traceback)
    return _json_renderer()


def _json_renderer() -> Processor:
    # ensure_ascii=False keeps a secret with non-ASCII characters recognisable by `redact`'s peers
    # (log scanners) instead of hiding it behind \u escapes.
    return structlog.processors.JSONRenderer(ensure_ascii=False, default=str)


def _formatter(shared: list[Processor], renderer: Processor) -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            # Tracebacks become text first, so `redact` sees (and masks) exception messages.
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )


class _OurHandler(logging.Handler):
    """Marker base so a second `configure_logging` replaces exactly the handlers the first added."""


class _StreamHandler(logging.StreamHandler[IO[str]], _OurHandler):
    pass


class _FileHandler(logging.FileHandler, _OurHandler):
    pass


class _TlsUpgradeNoise(logging.Filter):
    """asyncio warns on every connection the NATS client upgrades to TLS (its stream protocol's
    eof_received return value means nothing under TLS); the warning says nothing to an operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
    capture: str | None = None,
) -> None:
    """Route structlog and stdlib logging to `stream` (stdout by default) as JSON or console lines.

    With `capture` (a path; the CLI takes it from the LOG_CAPTURE_ENV environment variable), every
    line is also appended there as JSON: test suites scan it for leaks.
    """
    number = _level_number(level)
    out = sys.stdout if stream is None else stream
    renderer = _renderer(fmt, out)
    add_secrets(secrets)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _StreamHandler(out)
    handler.setFormatter(_formatter(shared, renderer))
    root.addHandler(handler)
    if capture:
        file_handler = _FileHandler(capture, mode="a", encoding="utf-8")
        file_handler.setFormatter(_formatter(shared, _json_renderer()))
        root.addHandler(file_handler)
    root.setLevel(number)

    # httpx logs every request URL at INFO, httpcore its wire chatter at DEBUG. Warnings and errors
    # still come through.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The AMQP client logs each failed connection with a traceback; the sink's own error line says
    # what happened (without the URL), so only its critical lines come through.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _TlsUpgradeNoise) for f in asyncio_log.filters):
        asyncio_log.addFilter(_TlsUpgradeNoise())
