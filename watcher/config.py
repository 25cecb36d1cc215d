"""The TOML configuration, parsed once into frozen records.

Durations and secrets are resolved here and nowhere else: after `load_config` returns, no code
reads a raw dict or the environment. Every problem becomes one `ConfigError` whose message starts
with the key path (`sinks[1].url`) and never carries a secret value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeGuard, cast
from urllib.parse import SplitResult, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from watcher.errors import ConfigError
from watcher.events import EVENT_TYPES
from watcher.lease import DEFAULT_TTL, MAX_TTL, MIN_TTL, LeaseTimings
from watcher.logs import FORMATS, LEVELS
from watcher.pii import CONTACT_FIELDS

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0

DEFAULT_TRACK: tuple[str, ...] = (
    "qaResult",
    "leadFlag",
    "processrStatus",
    "score",
    "maxScore",
    "hardfail",
    "advertiserBillable",
    "publisherBillable",
    "advertiserPayout",
    "publisherPayout",
    "baseCurrencyAdvertiserPayout",
    "baseCurrencyPublisherPayout",
    "visible",
    *CONTACT_FIELDS,  # a CRM keeps a person's contact details up to date
    "leadData",
)

# 5s, 5m, 30m, 2h, 5h, 10h, 14h, 20h, 24h: about 3.1 days of waits, so the 3-day max_age ends it first.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)

SinkType = Literal["webhook", "slack", "nats", "amqp", "redis"]
SINK_TYPES: tuple[SinkType, ...] = ("webhook", "slack", "nats", "amqp", "redis")
# Broker sinks: the URL schemes each takes (TLS first) and the modules its optional extra installs.
BROKER_SCHEMES: Mapping[str, tuple[str, str]] = {
    "nats": ("tls", "nats"),
    "amqp": ("amqps", "amqp"),
    "redis": ("rediss", "redis"),
}
BROKER_MODULES: Mapping[str, tuple[str, ...]] = {"nats": ("nats",), "amqp": ("aio_pika", "aiormq"), "redis": ("redis",)}
# The one placeholder a subject or routing key may hold: the event type ("lead.created").
TYPE_PLACEHOLDER = "{type}"


@dataclass(frozen=True)
class SinkTypeDefaults:
    include_pii: bool
    concurrency: int


# What a sink gets for a key its table leaves out, where that depends on its type: a Slack channel
# is a wider audience than a CRM endpoint, and Slack takes about one message a second per hook.
SINK_TYPE_DEFAULTS: Mapping[SinkType, SinkTypeDefaults] = {
    "webhook": SinkTypeDefaults(include_pii=True, concurrency=8),
    "slack": SinkTypeDefaults(include_pii=False, concurrency=1),
    "nats": SinkTypeDefaults(include_pii=True, concurrency=8),
    "amqp": SinkTypeDefaults(include_pii=True, concurrency=8),
    "redis": SinkTypeDefaults(include_pii=True, concurrency=8),
}
# Stands for "the default of this sink's type" until SinkConfig.__post_init__ replaces it.
_BY_TYPE: Any = object()


@dataclass(frozen=True)
class ConvertrConfig:
    base_url: str  # scheme://host[:port], no trailing slash
    username: str
    password: str = field(repr=False)
    items_per_page: int = 100
    timeout: float = 30.0
    # The zone the server compares filter values in. "auto": learnt from the offsets it writes and
    # checked against its filters; a zone name overrides (a disagreeing server draws a warning).
    timezone: str = "auto"
    max_in_flight: int = 4
    request_budget: int = 2000  # per rolling 5 minutes; Convertr cuts off at 3000
    # The most one answer may inflate to: far above a 100-lead page (about 1 MB), far below
    # what would hurt the host. A larger answer is an error, never read to the end.
    max_response_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class PostgresState:
    """`[state] url`: state in PostgreSQL, in one schema of the database (several enterprises may share it).

    `url` is the libpq connection URL as given, TLS parameters (sslmode, sslrootcert...) included:
    a secret, since it may carry the password. Anything shown to an operator uses `shown()`.
    """

    url: str = field(repr=False)
    host: str  # "" when the URL leaves it to libpq (a Unix socket, PGHOST)
    port: int | None
    dbname: str
    schema: str
    url_is_secret: bool = field(default=False, repr=False)
    # `[state] lease`: every daemon on this state leads by a lease this long (watcher.lease derives
    # the renewal, the standby's look, the leader's query bounds and the takeover bound from it).
    lease: float = DEFAULT_TTL

    @property
    def timings(self) -> LeaseTimings:
        return LeaseTimings(self.lease)

    def shown(self) -> str:
        """Where the state is, without user or password: for logs, errors and `status`."""
        port = f":{self.port}" if self.port else ""
        return f"postgresql://{self.host}{port}/{self.dbname} (schema {self.schema})"


@dataclass(frozen=True)
class StateConfig:
    # The SQLite file. With `url` (PostgreSQL) there is no file: this is Path() then, and nothing
    # may open it (the CLI refuses a PostgreSQL state until its store is wired in).
    path: Path
    delivered_retention: float = 7 * DAY
    attempt_log_retention: float = 14 * DAY
    # Dead deliveries, and queues of sinks no longer configured, are erased this long after they
    # died or were queued: they hold personal data that nothing will send any more.
    dead_retention: float = 30 * DAY
    postgres: PostgresState | None = None


@dataclass(frozen=True)
class LeadsConfig:
    enabled: bool = True
    interval: float = 60.0
    lookback: float = 600.0
    updates: bool = True
    campaign_ids: tuple[int, ...] = ()
    start: datetime | None = None  # None: baseline at "now"; otherwise an aware UTC datetime
    track: tuple[str, ...] = DEFAULT_TRACK
    recheck_window: float = 7 * DAY
    recheck_interval: float = 15 * MINUTE
    quiet_edits: bool = False  # re-read recheck_window even with an updatedTs filter: edits that leave it unmoved
    snapshot_retention: float = 90 * DAY
    safety_lag: float = 2.0
    baseline_window: float = 30 * DAY  # leads created this recently get a snapshot when tracking starts


@dataclass(frozen=True)
class CampaignsConfig:
    enabled: bool = True
    interval: float = 300.0


@dataclass(frozen=True)
class SinkConfig:
    """One delivery target. `include_pii` and `concurrency` default by type (SINK_TYPE_DEFAULTS),
    for the loader and for code that builds records by hand alike."""

    name: str
    type: SinkType
    url: str = field(repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)
    events: frozenset[str] = frozenset(EVENT_TYPES)
    campaign_ids: tuple[int, ...] = ()
    timeout: float = 15.0
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    max_age: float = 3 * DAY
    include_pii: bool = _BY_TYPE
    concurrency: int = _BY_TYPE
    enabled: bool = True
    url_is_secret: bool = field(default=False, repr=False)  # given as url_env / url_file
    # Broker sinks only: where a message goes. `subject` (nats) and `routing_key` (amqp) may hold {type}.
    subject: str = ""
    exchange: str = ""
    routing_key: str = TYPE_PLACEHOLDER
    stream: str = ""
    maxlen: int | None = None  # redis: trim the stream to about this many entries

    @property
    def broker(self) -> bool:
        return self.type in BROKER_SCHEMES

    def __post_init__(self) -> None:
        for name in ("include_pii", "concurrency"):
            if getattr(self, name) is _BY_TYPE:
                object.__setattr__(self, name, getattr(SINK_TYPE_DEFAULTS[self.type], name))


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class Config:
    path: Path
    convertr: ConvertrConfig
    state: StateConfig
    leads: LeadsConfig = LeadsConfig()
    campaigns: CampaignsConfig = CampaignsConfig()
    sinks: tuple[SinkConfig, ...] = ()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    # Problems worth a warning but not a refusal (the CLI logs them once logging is set up).
    warnings: tuple[str, ...] = ()
    # Key paths of secrets left unread: only a load with `secrets_required=False` leaves any, for
    # commands that read or change the state and never speak to Convertr or a sink.
    unresolved: tuple[str, ...] = ()
    # SHA-256 of the file's bytes as this load read them: what the daemon runs is told apart from
    # what is on disk now, even after the file changed under it.
    source_digest: str = ""

    def secret_values(self) -> tuple[str, ...]:
        """Every secret string the log redactor must hide."""
        values = [self.convertr.password]
        if self.state.postgres is not None:
            values.append(self.state.postgres.url)
            values.append(urlsplit(self.state.postgres.url).password or "")
        for sink in self.sinks:
            if sink.type == "slack" or sink.broker or sink.url_is_secret:
                values.append(sink.url)
            if sink.broker:
                values.append(urlsplit(sink.url).password or "")  # in case a library quotes it alone
            for key in sink.secrets:
                # Also the bare base64, in case something logs the key without its prefix.
                values.extend((key, key.removeprefix("whsec_")))
        return tuple(dict.fromkeys(v for v in values if v))

    def sink(self, name: str) -> SinkConfig:
        for sink in self.sinks:
            if sink.name == name:
                return sink
        raise KeyError(name)


# --------------------------------------------------------------------------------------------- loading

# Records holding nothing but defaults (blanks where a value is required): the loader reads every
# default from the dataclasses above, so each is written once.
_CONVERTR = ConvertrConfig(base_url="", username="", password="")
_STATE = StateConfig(path=Path())
_LEADS = LeadsConfig()
_CAMPAIGNS = CampaignsConfig()
_SINK = SinkConfig(name="", type="webhook", url="")
_LOG = LogConfig()


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *, secrets_required: bool = True
) -> Config:
    """Read, parse and validate the TOML file at `path`; raise ConfigError on the first problem.

    With `secrets_required=False` a secret whose `_env` or `_file` cannot be read is left empty
    and named in `Config.unresolved` instead of refused: the maintenance commands need the state,
    not the credentials, which under systemd exist only while the service runs.
    """
    shown = str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        raw = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(shown, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(shown, "is a directory, not a file") from None
    except PermissionError as exc:
        raise ConfigError(shown, f"cannot read file: {_strerror(exc)}{_unreadable_hint(Path(path))}") from None
    except OSError as exc:
        raise ConfigError(shown, f"cannot read file: {_strerror(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(shown, "invalid TOML: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(shown, f"invalid TOML: {_one_line(str(exc))}") from None
    config_path = Path(path).absolute()
    ctx = _Context(
        environ=os.environ if environ is None else environ, folder=config_path.parent, lenient=not secrets_required
    )
    config = _build(raw, config_path, ctx)
    warning = _exposed_secrets(config_path, ctx.literals)
    return replace(
        config,
        warnings=(warning,) if warning else (),
        unresolved=tuple(ctx.unresolved),
        source_digest=hashlib.sha256(data).hexdigest(),
    )


def state_path_of(path: str | os.PathLike[str]) -> Path | None:
    """`[state] path` of a configuration that does not load, so `status` can still show the state.

    The whole file is tried first, then the `[state]` table's lines on their own (a syntax error
    elsewhere leaves them readable). None when neither gives a path.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    folder = Path(path).absolute().parent
    try:
        table = tomllib.loads(text).get("state")
    except tomllib.TOMLDecodeError:
        match = re.search(r"^[ \t]*\[state\][ \t]*(?:#.*)?$(.*?)(?=^[ \t]*\[|\Z)", text, flags=re.M | re.S)
        try:
            table = tomllib.loads(match.group(1)) if match else None
        except tomllib.TOMLDecodeError:
            table = None
    value = table.get("path") if isinstance(table, dict) else None
    return folder / value if isinstance(value, str) and value.strip() else None


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes as `Config.source_digest` has it; None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _exposed_secrets(path: Path, literals: list[str]) -> str | None:
    """A warning when the file holds a secret written in it and people other than its owner may read it."""
    if not literals:
        return None
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if not mode & 0o077:
        return None
    # Key paths only, never values: the warning goes to the log. chmod 600 alone is no fix for the
    # shipped units: their DynamicUser= owns nothing, so the file must stay readable by others.
    return (
        f"{path} holds a literal secret ({', '.join(literals)}) and is readable by group or others "
        f"(mode {mode & 0o777:04o}): give the secret as X_file or X_env instead (under the systemd units, "
        "X_file from a LoadCredential= credential, see docs/operations.md 1.2), or, for a daemon that runs "
        "as the file's owner, chmod 600 it; the units' DynamicUser= needs the file root-owned with mode 0644"
    )


def _unreadable_hint(path: Path) -> str:
    """Why a config file is unreadable to this process, in the terms of the shipped systemd units."""
    try:
        st = path.stat()
    except OSError:
        return ""
    return (
        f" (this process runs as uid {os.geteuid()}; the file is owned by uid {st.st_uid} with mode "
        f"{st.st_mode & 0o777:04o}. The systemd units run as a DynamicUser= that owns nothing: make the file "
        "root-owned with mode 0644 and keep secrets out of it, in LoadCredential= files given as X_file)"
    )


@dataclass(frozen=True)
class _Context:
    environ: Mapping[str, str]
    folder: Path
    lenient: bool = False  # an unreadable `_env`/`_file` secret is noted in `unresolved`, not refused
    literals: list[str] = field(default_factory=list)  # key paths of secrets written in the file itself
    unresolved: list[str] = field(default_factory=list)


_TOP_KEYS = ("convertr", "state", "leads", "campaigns", "sinks", "metrics", "log")
_CONVERTR_KEYS = (
    *("base_url", "username", "password", "password_env", "password_file", "items_per_page", "timeout"),
    *("timezone", "max_in_flight", "request_budget", "max_response_bytes", "allow_http"),
)
_LEADS_KEYS = (
    *("enabled", "interval", "lookback", "updates", "campaign_ids", "start", "track", "recheck_window"),
    *("recheck_interval", "quiet_edits", "snapshot_retention", "safety_lag", "baseline_window"),
)
_SINK_KEYS = (
    *("name", "type", "url", "url_env", "url_file", "secret", "secret_env", "secret_file", "events"),
    *("campaign_ids", "timeout", "retry_schedule", "max_age", "include_pii", "concurrency", "enabled"),
    "allow_http",
)
# Keys only broker sinks take, by type.
_BROKER_KEYS: Mapping[str, tuple[str, ...]] = {
    "nats": ("subject",),
    "amqp": ("exchange", "routing_key"),
    "redis": ("stream", "maxlen"),
}


def _build(raw: dict[str, object], config_path: Path, ctx: _Context) -> Config:
    top = _Table(raw, "", _TOP_KEYS)
    convertr = _convertr(top.table("convertr", required=True), ctx)
    state = _state(top.table("state", required=True), ctx, convertr)
    leads = _leads(top.table("leads"))
    campaigns = _campaigns(top.table("campaigns"))
    sinks = _sinks(top, ctx)
    metrics = _metrics(top.table("metrics"))
    log = _log(top.table("log"))
    return Config(config_path, convertr, state, leads, campaigns, sinks, metrics, log)


def _convertr(t: _Table, ctx: _Context) -> ConvertrConfig:
    t.check_keys(_CONVERTR_KEYS)
    base_url = _base_url(t.require("base_url"), t.key("base_url"))
    _require_https(base_url, t.key("base_url"), t.boolean("allow_http", False), t.key("allow_http"))
    username = _nonempty_str(t.require("username"), t.key("username"))
    password, password_key, indirect = _secret(t, "password", ctx)
    if not indirect:
        ctx.literals.append(password_key)
    return ConvertrConfig(
        base_url=base_url,
        username=username,
        password=password,
        items_per_page=t.integer("items_per_page", _CONVERTR.items_per_page, 1, 100),
        timeout=t.duration("timeout", _CONVERTR.timeout),
        timezone=_timezone(t.get("timezone", _CONVERTR.timezone), t.key("timezone")),
        max_in_flight=t.integer("max_in_flight", _CONVERTR.max_in_flight, 1, 10),
        request_budget=t.integer("request_budget", _CONVERTR.request_budget, 1, 2900),
        max_response_bytes=t.integer("max_response_bytes", _CONVERTR.max_response_bytes, 65_536, 1 << 31),
    )


_RETENTION_KEYS = ("delivered_retention", "attempt_log_retention", "dead_retention")


def _state(t: _Table, ctx: _Context, convertr: ConvertrConfig) -> StateConfig:
    t.check_keys(("path", *_secret_keys("url"), "schema", "lease", *_RETENTION_KEYS))
    urls = [key for key in _secret_keys("url") if key in t.data]
    if "path" in t.data and urls:
        raise ConfigError(
            t.key(urls[0]), f"give either {t.key('path')} (SQLite) or {t.key('url')} (PostgreSQL), not both"
        )
    if "schema" in t.data and not urls:
        raise ConfigError(t.key("schema"), f"only with {t.key('url')} (PostgreSQL)")
    if "lease" in t.data and not urls:
        raise ConfigError(t.key("lease"), f"only with {t.key('url')} (PostgreSQL): an SQLite state has no leader lease")
    postgres = None
    if urls:
        postgres = _postgres(t, ctx, convertr)
        where = Path()
    elif "path" in t.data:
        where = ctx.folder / _nonempty_str(t.data["path"], t.key("path"))
    else:
        raise ConfigError(t.key("path"), f"missing required key (or {t.key('url')} for PostgreSQL)")
    return StateConfig(
        path=where,
        postgres=postgres,
        delivered_retention=t.duration("delivered_retention", _STATE.delivered_retention),
        attempt_log_retention=t.duration("attempt_log_retention", _STATE.attempt_log_retention),
        dead_retention=t.duration("dead_retention", _STATE.dead_retention),
    )


POSTGRES_SCHEMES = ("postgresql", "postgres")
# What a schema name may be: a plain lower-case SQL identifier, so it is never quoted wrongly.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def default_schema(base_url: str) -> str:
    """The schema an enterprise's state gets when `[state] schema` is not given.

    `convertr_` and the enterprise's name, the first label of the Convertr host
    (`https://acme.cvtr.io` → `convertr_acme`), made a plain identifier: two configurations for
    the same enterprise share one state and one leader, two enterprises never do.
    """
    host = urlsplit(base_url).hostname or ""
    label = re.sub(r"[^a-z0-9_]", "_", host.split(".")[0].lower()) or "default"
    return f"convertr_{label}"[:63]


def _postgres(t: _Table, ctx: _Context, convertr: ConvertrConfig) -> PostgresState:
    """`[state] url`: a postgresql:// URL, checked without ever quoting it (it may hold the password)."""
    _require_module("psycopg", t.key("url"), "PostgreSQL state needs the [postgres] extra", "postgres")
    url, url_key, indirect = _secret(t, "url", ctx)
    lease = _lease(t)
    schema = t.get("schema", None)
    if schema is None:
        schema = default_schema(convertr.base_url)
    elif not schema_name_ok(schema):
        raise ConfigError(
            t.key("schema"), "must be a lower-case SQL name: letters, digits and '_', at most 63, not starting pg_"
        )
    if not url:  # a maintenance command whose url_env/url_file is unreadable (lenient load)
        return PostgresState(url="", host="", port=None, dbname="", schema=schema, url_is_secret=True, lease=lease)
    state = replace(postgres_state(url, url_key, schema, url_is_secret=indirect), lease=lease)
    if not indirect and urlsplit(url).password:
        ctx.literals.append(url_key)  # a password written in the file
    return state


def _lease(t: _Table) -> float:
    return parse_lease(t.get("lease", DEFAULT_TTL), t.key("lease"))


def parse_lease(value: object, path: str) -> float:
    """`[state] lease` (or a tool's --lease): a duration within MIN_TTL..MAX_TTL (watcher.lease says why those)."""
    lease = _bounded_duration(value, path, None)
    if not MIN_TTL <= lease <= MAX_TTL:
        raise ConfigError(path, f"must be from {MIN_TTL:g}s to {MAX_TTL:g}s (5m), got {lease:g}s")
    return lease


def postgres_state(url: str, url_key: str, schema: str, *, url_is_secret: bool = True) -> PostgresState:
    """A postgresql:// URL checked without ever quoting it (it may hold the password); ConfigError names `url_key`."""
    problem = "must be a postgresql:// URL naming the database (postgresql://user@host:5432/dbname?sslmode=...)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(url_key, problem) from None
    dbname = parts.path.removeprefix("/")
    if any(ch.isspace() for ch in url) or parts.scheme.lower() not in POSTGRES_SCHEMES or not dbname:
        raise ConfigError(url_key, problem)
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)  # libpq's own parser: an unknown parameter is refused here, not at connect
    except ProgrammingError:
        raise ConfigError(url_key, "is not a connection URL libpq accepts (check the ?parameters)") from None
    return PostgresState(
        url=url, host=parts.hostname or "", port=port, dbname=dbname, schema=schema, url_is_secret=url_is_secret
    )


def schema_name_ok(schema: object) -> TypeGuard[str]:
    """Whether `schema` may name a state's PostgreSQL schema (never quoted wrongly, not a system one)."""
    return isinstance(schema, str) and bool(_SCHEMA_NAME.fullmatch(schema)) and not schema.startswith("pg_")


def _leads(t: _Table) -> LeadsConfig:
    t.check_keys(_LEADS_KEYS)
    return LeadsConfig(
        enabled=t.boolean("enabled", _LEADS.enabled),
        interval=t.duration("interval", _LEADS.interval, minimum=1.0),
        lookback=t.duration("lookback", _LEADS.lookback, minimum=0.0),
        updates=t.boolean("updates", _LEADS.updates),
        campaign_ids=_campaign_ids(t.get("campaign_ids", list(_LEADS.campaign_ids)), t.key("campaign_ids")),
        start=_start(t.get("start", "now"), t.key("start")),  # "now" is how TOML says None
        track=_track(t.get("track", list(_LEADS.track)), t.key("track")),
        recheck_window=t.duration("recheck_window", _LEADS.recheck_window),
        recheck_interval=t.duration("recheck_interval", _LEADS.recheck_interval, minimum=1.0),
        quiet_edits=t.boolean("quiet_edits", _LEADS.quiet_edits),
        snapshot_retention=t.duration("snapshot_retention", _LEADS.snapshot_retention),
        safety_lag=t.duration("safety_lag", _LEADS.safety_lag, minimum=0.0),
        baseline_window=t.duration("baseline_window", _LEADS.baseline_window, minimum=0.0),
    )


def _campaigns(t: _Table) -> CampaignsConfig:
    t.check_keys(("enabled", "interval"))
    return CampaignsConfig(
        enabled=t.boolean("enabled", _CAMPAIGNS.enabled), interval=t.duration("interval", _CAMPAIGNS.interval, 1.0)
    )


def _sinks(top: _Table, ctx: _Context) -> tuple[SinkConfig, ...]:
    raw = top.get("sinks", [])
    if not isinstance(raw, list):
        raise ConfigError("sinks", "must be an array of tables ([[sinks]])")
    sinks: list[SinkConfig] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"sinks[{index}]", "must be a table ([[sinks]])")
        sink = _sink(_Table(cast(dict[str, object], item), f"sinks[{index}]"), ctx)
        if sink.name in seen:
            raise ConfigError(f"sinks[{index}].name", f"duplicate sink name {_quote(sink.name)}")
        seen.add(sink.name)
        sinks.append(sink)
    return tuple(sinks)


_SINK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _sink(t: _Table, ctx: _Context) -> SinkConfig:
    broker_keys = tuple(k for keys in _BROKER_KEYS.values() for k in keys)
    t.check_keys(_SINK_KEYS + broker_keys)
    name = t.require("name")
    if not isinstance(name, str) or not _SINK_NAME.fullmatch(name):
        raise ConfigError(t.key("name"), "must be 1 to 64 letters, digits, '-' or '_'")
    type_ = t.require("type")
    if type_ not in SINK_TYPES:
        raise ConfigError(t.key("type"), f"must be one of {_choices(SINK_TYPES)}")
    kind: SinkType = type_
    for key in broker_keys:
        if key in t.data and key not in _BROKER_KEYS.get(kind, ()):
            owners = [k for k, keys in _BROKER_KEYS.items() if key in keys]
            raise ConfigError(t.key(key), f"only for {owners[0]} sinks")
    if kind in BROKER_SCHEMES:
        _require_extra(kind, t.key("type"))
    url, url_key, url_is_secret = _secret(t, "url", ctx)
    allow_http = t.boolean("allow_http", False)
    if url or url_key not in ctx.unresolved:
        try:
            if kind in BROKER_SCHEMES:
                _broker_url(url, url_key, kind, allow_http, t.key("allow_http"))
            else:
                if not _is_http_url(url):
                    raise ConfigError(url_key, "must be an http(s) URL")
                _require_https(url, url_key, allow_http, t.key("allow_http"))
        except ConfigError:
            # A maintenance command never sends: a broken credential file must not lock it out.
            if not (ctx.lenient and url_is_secret):
                raise
            ctx.unresolved.append(url_key)
            url = ""
    if kind in BROKER_SCHEMES and not url_is_secret and urlsplit(url).password:
        ctx.literals.append(url_key)  # a password written in the file
    if kind == "slack" and not url_is_secret:
        ctx.literals.append(url_key)  # a Slack incoming-webhook URL is itself the credential
    secrets: tuple[str, ...] = ()
    if kind in BROKER_SCHEMES:
        # Optional here: a broker's own access control says who may publish; a key lets consumers
        # check that a message came from this daemon.
        if any(key in t.data for key in _secret_keys("secret")):
            value, secret_key, indirect = _secret(t, "secret", ctx)
            secrets = _webhook_keys(value, secret_key)
            if not indirect:
                ctx.literals.append(secret_key)
    elif kind == "slack":
        for key in _secret_keys("secret"):
            if key in t.data:
                raise ConfigError(t.key(key), "slack sinks take no secret")
    else:
        if not any(key in t.data for key in _secret_keys("secret")):
            raise ConfigError(t.key("secret"), "required for webhook sinks (secret, secret_env or secret_file)")
        value, secret_key, indirect = _secret(t, "secret", ctx)
        try:
            secrets = _webhook_keys(value, secret_key) if value else ()
        except ConfigError:
            if not (ctx.lenient and indirect):
                raise
            ctx.unresolved.append(secret_key)
        if not indirect:
            ctx.literals.append(secret_key)
    by_type = SINK_TYPE_DEFAULTS[kind]
    return SinkConfig(
        name=name,
        type=kind,
        url=url,
        secrets=secrets,
        events=_events(t.get("events", sorted(_SINK.events)), t.key("events")),
        campaign_ids=_campaign_ids(t.get("campaign_ids", list(_SINK.campaign_ids)), t.key("campaign_ids")),
        timeout=t.duration("timeout", _SINK.timeout),
        retry_schedule=_retry_schedule(t.get("retry_schedule", list(_SINK.retry_schedule)), t.key("retry_schedule")),
        max_age=t.duration("max_age", _SINK.max_age),
        include_pii=t.boolean("include_pii", by_type.include_pii),
        concurrency=t.integer("concurrency", by_type.concurrency, 1, 32),
        enabled=t.boolean("enabled", _SINK.enabled),
        url_is_secret=url_is_secret,
        **_destination(t, kind),
    )


def _require_extra(kind: str, path: str) -> None:
    """Refuse a broker type whose client library is not installed, naming the extra that brings it."""
    for module in BROKER_MODULES[kind]:
        _require_module(module, path, f'"{kind}" sinks need the [{kind}] extra', kind)


def _require_module(module: str, path: str, what: str, extra: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(path, f'{what}: pip install "convertr-watcher[{extra}]"')


def _broker_url(url: str, path: str, kind: str, allow_plain: bool, allow_key: str) -> None:
    """A broker URL of the type's scheme with a host; plain (unencrypted) only to loopback or when allowed.

    Messages never quote the URL: it usually carries the broker password.
    """
    secure, plain = BROKER_SCHEMES[kind]
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ConfigError(path, f"must be a {secure}:// or {plain}:// URL with a valid host and port") from None
    if any(ch.isspace() for ch in url) or parts.scheme.lower() not in (secure, plain) or not parts.hostname:
        raise ConfigError(path, f"must be a {secure}:// or {plain}:// URL with a host")
    if parts.scheme.lower() == plain and not allow_plain and not _is_loopback(parts.hostname):
        raise ConfigError(
            path,
            f"must be a {secure}:// URL (plain {plain}:// only to a loopback host, or with {allow_key} = true)",
        )


def _destination(t: _Table, kind: SinkType) -> dict[str, Any]:
    """Where a broker sink's messages go: its subject, exchange and routing key, or stream."""
    if kind == "nats":
        return {"subject": _template(t.require("subject"), t.key("subject"), subject=True)}
    if kind == "amqp":
        exchange = t.require("exchange")
        if not isinstance(exchange, str) or not exchange or len(exchange) > 255:
            raise ConfigError(t.key("exchange"), "must be the name of an existing exchange (1 to 255 characters)")
        routing_key = _template(t.get("routing_key", _SINK.routing_key), t.key("routing_key"), subject=False)
        return {"exchange": exchange, "routing_key": routing_key}
    if kind == "redis":
        stream = _nonempty_str(t.require("stream"), t.key("stream"))
        maxlen = t.get("maxlen", None)
        if maxlen is not None:
            maxlen = t.integer("maxlen", 0, 1, 1 << 62)
        return {"stream": stream, "maxlen": maxlen}
    return {}


_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+")


def _template(value: object, path: str, *, subject: bool) -> str:
    """A subject or routing key in which `{type}` is the only placeholder."""
    if not isinstance(value, str) or not value:
        raise ConfigError(path, "must be a non-empty string")
    filled = value.replace(TYPE_PLACEHOLDER, "lead.created")
    if "{" in filled or "}" in filled:
        raise ConfigError(path, f"{TYPE_PLACEHOLDER} is the only placeholder")
    if len(filled.encode()) > 255 and not subject:
        raise ConfigError(path, "must be at most 255 bytes once {type} is filled in")
    if subject and not all(_SUBJECT_TOKEN.fullmatch(token) for token in filled.split(".")):
        raise ConfigError(path, 'must be a NATS subject: dot-separated tokens, no spaces and no wildcards ("*", ">")')
    return value


def _metrics(t: _Table) -> MetricsConfig:
    t.check_keys(("listen", "allow_remote"))
    value = t.get("listen", None)
    allow_remote = t.boolean("allow_remote", False)
    if value is None:
        return MetricsConfig()
    listen = _listen(value, t.key("listen"))
    # /metrics names sinks and streams and /healthz says what is failing: not for the whole network
    # unless the operator says so (and then a firewall or proxy is theirs to put in front).
    if not allow_remote and not _is_loopback(listen[0]):
        raise ConfigError(
            t.key("listen"),
            f"{_quote(listen[0])} is not a loopback address; set {t.key('allow_remote')} = true "
            "to serve /metrics and /healthz beyond this host",
        )
    return MetricsConfig(listen=listen)


def _log(t: _Table) -> LogConfig:
    t.check_keys(("level", "format"))
    level = t.get("level", _LOG.level)
    if not isinstance(level, str) or level.lower() not in LEVELS:
        raise ConfigError(t.key("level"), f"must be one of {_choices(LEVELS)}")
    fmt = t.get("format", _LOG.format)
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ConfigError(t.key("format"), f"must be one of {_choices(FORMATS)}")
    return LogConfig(level=level.lower(), format=fmt.lower())


# ------------------------------------------------------------------------------------------ tables


_MISSING = object()


class _Table:
    """A TOML table with its key path, read one key at a time."""

    def __init__(self, data: dict[str, object], path: str, allowed: Iterable[str] | None = None) -> None:
        self.data = data
        self.path = path
        if allowed is not None:
            self.check_keys(tuple(allowed))

    def key(self, name: str) -> str:
        shown = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _quote(name)
        return f"{self.path}.{shown}" if self.path else shown

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for name in self.data:
            if name not in allowed:
                raise ConfigError(self.key(name), "unknown key")

    def get(self, name: str, default: object) -> object:
        return self.data.get(name, default)

    def require(self, name: str) -> object:
        if name not in self.data:
            raise ConfigError(self.key(name), "missing required key")
        return self.data[name]

    def table(self, name: str, *, required: bool = False) -> _Table:
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise ConfigError(self.key(name), f"missing required table [{name}]")
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(self.key(name), "must be a table")
        return _Table(cast(dict[str, object], value), self.key(name))

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), "must be true or false")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(self.key(name), f"must be an integer from {low} to {high}")
        return value

    def duration(self, name: str, default: float, minimum: float | None = None) -> float:
        return _bounded_duration(self.get(name, default), self.key(name), minimum)


# ------------------------------------------------------------------------------------------ values


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"d": DAY, "h": HOUR, "m": MINUTE, "s": 1.0, "ms": 0.001}
_UNIT_ORDER = ("d", "h", "m", "s", "ms")
_DURATION_HELP = 'must be a duration: a number of seconds or a string such as "90s", "5m", "2h", "1d", "1h30m"'


def parse_duration(value: object, path: str) -> float:
    """Seconds from an int/float number of seconds or a string like "90s", "5m", "2h", "1d", "1h30m"."""
    if isinstance(value, bool):
        raise ConfigError(path, _DURATION_HELP)
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer too large for a float
            seconds = math.inf
    elif isinstance(value, str):
        seconds = _duration_string(value.strip(), path)
    else:
        raise ConfigError(path, _DURATION_HELP)
    if not math.isfinite(seconds):
        raise ConfigError(path, "must be a finite duration")
    if seconds < 0:
        raise ConfigError(path, "must not be negative")
    return seconds


def _duration_string(text: str, path: str) -> float:
    total = 0.0
    position = 0
    last_unit = -1
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ConfigError(path, _DURATION_HELP)
        # Units must come largest first, each once: "1h30m" is clear, "30m1h" or "5m5m" is a typo.
        unit = _UNIT_ORDER.index(match.group(2))
        if unit <= last_unit:
            raise ConfigError(path, _DURATION_HELP)
        last_unit = unit
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position == 0:
        raise ConfigError(path, _DURATION_HELP)
    return total


def _bounded_duration(value: object, path: str, minimum: float | None) -> float:
    """A duration that must be positive (minimum None) or at least `minimum` seconds."""
    seconds = parse_duration(value, path)
    if minimum is None and seconds <= 0:
        raise ConfigError(path, "must be a positive duration")
    if minimum is not None and seconds < minimum:
        raise ConfigError(path, f"must be at least {minimum:g}s")
    return seconds


def _retry_schedule(value: object, path: str) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(path, "must be a non-empty list of durations")
    return tuple(_bounded_duration(item, f"{path}[{i}]", None) for i, item in enumerate(value))


def _nonempty_str(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, "must be a non-empty string")
    return value


def _base_url(value: object, path: str) -> str:
    problem = "must be an http(s) URL with no path"
    if not isinstance(value, str):
        raise ConfigError(path, problem)
    parts = _http_parts(value)
    if parts is None or parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(path, problem)
    if value.rstrip("/").endswith(("?", "#")):
        raise ConfigError(path, problem)
    return f"{parts.scheme.lower()}://{parts.netloc}"


def _is_loopback(host: str) -> bool:
    """Whether `host` names this machine only: localhost, 127.0.0.0/8 or ::1."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_https(url: str, path: str, allow_http: bool, allow_key: str) -> None:
    """Refuse plain http beyond loopback: the password, tokens and personal data would cross the network in clear."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "https" or allow_http or _is_loopback(parts.hostname or ""):
        return
    # The key path only: a sink URL may itself be the secret (Slack).
    raise ConfigError(path, f"must be an https:// URL (plain http only to a loopback host, or with {allow_key} = true)")


def _is_http_url(value: str) -> bool:
    return _http_parts(value) is not None


def _http_parts(value: str) -> SplitResult | None:
    if not value or any(ch.isspace() for ch in value) or not value.isprintable():
        return None
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return parts


def _timezone(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, 'must be "auto" or an IANA time zone name such as "Europe/London"')
    if value == "auto":
        return value
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(path, f"unknown time zone {_quote(value)}") from None
    return value


def _campaign_ids(value: object, path: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, "must be a list of campaign ids")
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ConfigError(f"{path}[{index}]", "must be a positive integer")
    return tuple(dict.fromkeys(cast(list[int], value)))


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _start(value: object, path: str) -> datetime | None:
    problem = 'must be "now" or an RFC 3339 time with an offset, such as "2024-01-31T00:00:00Z"'
    if value == "now":
        return None
    if isinstance(value, datetime):  # an unquoted TOML date-time
        if value.tzinfo is None:
            raise ConfigError(path, problem)
        return value.astimezone(UTC)
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ConfigError(path, problem)
    try:
        parsed = datetime.fromisoformat(value.upper().replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        raise ConfigError(path, problem) from None
    return parsed.astimezone(UTC)


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[^\s.][^\s]*)?")


def _track(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of lead field names")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not _FIELD_NAME.fullmatch(item):
            raise ConfigError(f"{path}[{index}]", 'must be a lead field name such as "qaResult"')
    return tuple(dict.fromkeys(cast(list[str], value)))


def _events(value: object, path: str) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of event types")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{index}]", "must be an event type string")
        if item not in EVENT_TYPES:
            raise ConfigError(f"{path}[{index}]", f"unknown event type {_quote(item)}")
    return frozenset(cast(list[str], value))


def _listen(value: object, path: str) -> tuple[str, int]:
    problem = 'must be "host:port", such as "127.0.0.1:9464" or "[::1]:9464"'
    if not isinstance(value, str):
        raise ConfigError(path, problem)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", value)
    if match is None:
        raise ConfigError(path, problem)
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ConfigError(path, "port must be from 0 to 65535")
    return host, port


# ----------------------------------------------------------------------------------------- secrets


def _secret_keys(name: str) -> tuple[str, str, str]:
    return name, f"{name}_env", f"{name}_file"


def _secret(t: _Table, name: str, ctx: _Context) -> tuple[str, str, bool]:
    """The value of secret `name` from its one given form: (value, key path used, came from env/file)."""
    given = [key for key in _secret_keys(name) if key in t.data]
    if len(given) > 1:
        raise ConfigError(t.key(name), f"give only one of {', '.join(_secret_keys(name))}")
    if not given:
        raise ConfigError(t.key(name), f"missing required key (give {', '.join(_secret_keys(name))})")
    key = given[0]
    path = t.key(key)
    raw = t.data[key]
    if key == name:
        if not isinstance(raw, str) or not raw:
            raise ConfigError(path, "must be a non-empty string")
        return raw, path, False
    if not isinstance(raw, str) or not raw.strip():
        what = "an environment variable name" if key.endswith("_env") else "a file path"
        raise ConfigError(path, f"must be {what}")
    try:
        if key.endswith("_env"):
            if raw not in ctx.environ:
                raise ConfigError(path, f"{_env_name(raw)} is not set")
            value = ctx.environ[raw]
            if not value:
                raise ConfigError(path, f"{_env_name(raw)} is empty")
            return value, path, True
        return _read_secret_file(ctx.folder / raw, path, relative=not Path(raw).is_absolute()), path, True
    except ConfigError:
        if not ctx.lenient:
            raise
        ctx.unresolved.append(path)
        return "", path, True


def _read_secret_file(file: Path, path: str, *, relative: bool) -> str:
    # The file name is not repeated: operators sometimes paste the secret itself where a path belongs.
    try:
        text = file.read_bytes().decode("utf-8").strip()
    except IsADirectoryError:
        raise ConfigError(path, "cannot read the file: it is a directory") from None
    except OSError as exc:
        where = " (relative to the config folder)" if relative else ""
        raise ConfigError(path, f"cannot read the file: {_strerror(exc)}{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "the file is not UTF-8 text") from None
    if not text:
        raise ConfigError(path, "the file is empty")
    return text


def _webhook_keys(value: str, path: str) -> tuple[str, ...]:
    keys = tuple(value.split())
    for number, key in enumerate(keys, start=1):
        if not 24 <= len(_whsec_bytes(key)) <= 64:
            raise ConfigError(path, f'key {number} must be "whsec_" followed by the base64 of 24 to 64 random bytes')
    return keys


def _whsec_bytes(key: str) -> bytes:
    """The HMAC key a `whsec_<base64>` string stands for; empty when it is malformed."""
    if not key.startswith("whsec_"):
        return b""
    body = key.removeprefix("whsec_")
    try:
        # Standard Webhooks libraries accept unpadded base64, so we do too.
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        return b""


# ----------------------------------------------------------------------------------------- helpers


def _quote(value: str, limit: int = 80) -> str:
    """A non-secret value shown in an error, quoted and escaped so the message stays one line."""
    if len(value) > limit:
        value = value[:limit] + "…"
    return json.dumps(value, ensure_ascii=False)


def _choices(values: Iterable[str]) -> str:
    return ", ".join(json.dumps(v) for v in values)


def _env_name(name: str) -> str:
    """How an `X_env` value is named in an error: by name only when it looks like one (upper case),
    since a lower-case or punctuated value may be the secret itself pasted in the wrong key."""
    if re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", name):
        return f"environment variable {name}"
    return "the environment variable it names"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text[:1].lower() + text[1:]


def _strerror(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()
