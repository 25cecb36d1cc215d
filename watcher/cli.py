"""The `convertr-watcher` command line.

Exit codes (watcher.exitcodes): 0 ok, 1 runtime failure, 2 a command line that makes no sense, 75
state file in use by another writer, 78 configuration error. A user mistake prints one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watcher import __version__
from watcher.clock import SystemClock
from watcher.config import Config, PostgresState, SinkConfig, StateConfig, load_config
from watcher.errors import (
    AuthError,
    ConfigError,
    DeliveryError,
    StateDamaged,
    StateError,
    StateLocked,
    StateLost,
    StateTooNew,
    WatcherError,
)
from watcher.events import EVENT_TYPES, WATCHER_TEST
from watcher.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_OK, EXIT_USAGE
from watcher.logs import LOG_CAPTURE_ENV, configure_logging, known_secrets, scrub

PROG = "convertr-watcher"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace, *, secrets_required: bool = True) -> Config:
    """The configuration, logging set up from it. Commands that only read or change the state pass
    `secrets_required=False`: they must work while the service's credentials are not on disk."""
    config = load_config(args.config, secrets_required=secrets_required)
    if config.state.postgres is not None and args.command not in _ON_POSTGRES:
        raise ConfigError(
            "state.url", f"`{args.command}` does not work on a PostgreSQL state in this release yet: use [state] path"
        )
    configure_logging(
        config.log.level, config.log.format, secrets=config.secret_values(), capture=os.environ.get(LOG_CAPTURE_ENV)
    )
    for warning in config.warnings:
        # stderr, not the log stream: stdout may be `status --json` that a script parses.
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return config


# Commands wired to a PostgreSQL state ([state] url); the others refuse it in one line.
_ON_POSTGRES = frozenset({"check", "run", "once", "status", "events", "replay", "forget", "send-test", "copy-state"})


def _writing(args: argparse.Namespace, config: Config) -> AbstractContextManager[object]:
    """The state file's write lock for a command that polls and delivers, held until the command ends.

    On PostgreSQL the leadership lease takes its place (watcher.leading): `run` stands by while
    another daemon leads, `once` refuses.
    """
    from watcher.lock import state_lock

    if config.state.postgres is not None:
        return nullcontext()

    # Named by subcommand and config path only: argv could carry anything an operator typed.
    command = f"{PROG} {args.command} -c {os.path.abspath(args.config)}"
    return state_lock(config.state.path, command)


def _ts(value: float | None) -> str:
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds") if value else "-"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {text!r}")
    return int(text)


def _time_arg(text: str) -> float:
    """An RFC 3339 time, or a duration back from now (`90m`, `1h`, `2d`): Unix seconds."""
    from watcher.config import parse_duration

    if text[:1].isdigit() and text[-1:].isalpha():
        try:
            return SystemClock().now() - parse_duration(text, "")
        except ConfigError:
            pass
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an RFC 3339 time or a duration back from now (1h, 2d): {text!r}"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


# --- commands -------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from watcher.daemon import run_daemon
    from watcher.notify import Notifier

    config = _load(args)
    with _writing(args, config):
        notifier = Notifier.from_environ(os.environ)
        return asyncio.run(run_daemon(config, SystemClock(), notifier, start_over=_start_over(args)))


def cmd_once(args: argparse.Namespace) -> int:
    from watcher.daemon import run_once

    config = _load(args)
    progress = _progress_bar() if sys.stderr.isatty() else None
    with _writing(args, config):
        return asyncio.run(run_once(config, SystemClock(), progress=progress, start_over=_start_over(args)))


def _start_over(args: argparse.Namespace) -> str | None:
    """None when `--start-over` was given; else the command line that would give it, for the refusal."""
    return None if args.start_over else f"{PROG} {args.command} -c {args.config}"


def _progress_bar() -> Any:
    def show(done: int, total: int | None) -> None:
        if total:
            width = 30
            filled = min(width, int(width * done / max(total, 1)))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} leads")
        else:
            sys.stderr.write(f"\r{done} leads")
        sys.stderr.flush()

    return show


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"{args.config}: valid")
    print(f"  convertr: {config.convertr.base_url} as {config.convertr.username}")
    if config.state.postgres is not None and not args.state:
        pg = config.state.postgres
        bound = pg.timings.takeover_bound
        print(f"  state: {pg.shown()}, lease {pg.lease:g}s (a standby leads within {bound:g}s of a crash)")
    for sink in config.sinks:
        state = "enabled" if sink.enabled else "disabled in config"
        print(f"  sink {sink.name}: {sink.type}, {len(sink.events)} event types, {state}")
    if not config.sinks:
        print("  warning: no sinks configured; events are detected and kept, but go nowhere")
    if args.state:
        _check_state(config)
    if not args.connect:
        return EXIT_OK
    return asyncio.run(_connect(config))


def _check_state(config: Config) -> None:
    """`check --state`: SQLite's full integrity check and the lineage check; StateDamaged/StateLost end it.
    On PostgreSQL: whether the state answers, its schema version, and who leads (StateError ends it)."""
    from watcher.lineage import marked_since, refuse_lost_history
    from watcher.state.store import Store

    if config.state.postgres is not None:
        _check_postgres_state(config.state.postgres)
        return
    path = config.state.path
    refuse_lost_history(path, f"{PROG} run -c {os.path.abspath(config.path)}")
    if not path.exists():
        print(f"  state: no file at {path} yet (the daemon has not run)")
        return
    with Store.open_readonly(path) as store:
        store.verify()
        streams = len(store.cursors())
    since = marked_since(path)
    history = f", polling since {since}" if since else ""
    print(f"  state: {path} passes SQLite's integrity check; {streams} streams with a cursor{history}")


def _check_postgres_state(postgres: PostgresState) -> None:
    """`check --state` on PostgreSQL, read-only: the state answers, its schema version, who leads."""
    from watcher.state.pgcheck import check_postgres

    found = check_postgres(postgres)
    where = postgres.shown()
    if found.version is None:
        print(f"  state: {where} answers; no state there yet (the first daemon to lead makes it)")
    elif found.version < found.knows:
        print(
            f"  state: {where} answers; schema version {found.version}, older than this release's "
            f"({found.knows}): the daemon migrates it when it next leads; {found.cursors} streams with a cursor"
        )
    else:
        print(f"  state: {where} answers; schema version {found.version}; {found.cursors} streams with a cursor")
    leader = found.leadership.leader
    if leader is None:
        print("  leader: none (no daemon leads now)")
    else:
        print(
            f"  leader: pid {leader.pid} on {leader.host}, epoch {leader.epoch}, "
            f"since {leader.since.isoformat(timespec='seconds')}"
        )
    for member in found.leadership.standbys:
        print(f"  standing by: pid {member.pid} on {member.host}")


async def _connect(config: Config) -> int:
    """Log in, read one lead, reach every enabled sink; the exit status for `check --connect`."""
    from watcher.calibration import calibrate
    from watcher.convertr import ConvertrClient
    from watcher.servertime import ServerClock

    code = EXIT_OK
    try:
        async with ConvertrClient(config.convertr, clock=SystemClock()) as client:
            await client.login()
            calibration = await calibrate(
                client, ServerClock(SystemClock(), config.convertr.timezone), config.leads.campaign_ids
            )
        print("  login: ok; leads readable")
        print(f"  server time zone: {calibration.zone}")
        print(f"  createdTs filter: {calibration.checked}")
        for warning in calibration.warnings:
            print(f"  warning: {warning}")
    except AuthError as exc:
        print(f"  login: refused ({exc})")
        code = EXIT_CONFIG
    except WatcherError as exc:
        print(f"  login: cannot reach the API ({exc})")
        code = EXIT_FAILURE
    refused = _disabled_in_state(config)
    for sink in config.sinks:
        if not sink.enabled:
            print(f"  sink {sink.name}: disabled in config, not checked")
            continue
        if sink.name in refused:
            why = refused[sink.name]
            print(f"  sink {sink.name}: DISABLED by the daemon {why}; `replay --sink {sink.name}` enables it")
        problem = await _reach(sink)
        if problem is not None:
            # A broker may be reached and still refuse the events (no stream, no exchange).
            print(
                f"  sink {sink.name}: cannot deliver ({problem})"
                if sink.broker
                else f"  sink {sink.name}: cannot reach {problem}"
            )
            code = code or EXIT_FAILURE
    if code == EXIT_CONFIG:
        return _fail("convertr: login refused: check [convertr] username and password", EXIT_CONFIG)
    if code:
        return _fail("check --connect: something cannot be reached (see above)", code)
    return EXIT_OK


def _disabled_in_state(config: Config) -> dict[str, str]:
    """Sinks the daemon disabled after a permanent refusal, with the reason (scrubbed); read-only."""
    from watcher.state.store import open_store_readonly

    if config.state.postgres is None and not config.state.path.exists():
        return {}
    try:
        store = open_store_readonly(config.state)
    except StateError:
        return {}
    with store:
        states = store.sink_states([s.name for s in config.sinks], only=True)
    secrets = known_secrets()
    return {
        s.name: f"since {_ts(s.disabled_at)} ({scrub(s.disabled_reason or 'refused', secrets)})"
        for s in states
        if s.disabled_at is not None
    }


async def _reach(sink_config: SinkConfig) -> str | None:
    """None once the sink's receiver is reached (printed), else why not; no event is sent. A broker
    sink's reach is its own handshake and a look for its stream or exchange."""
    from watcher.sinks import build_sink
    from watcher.sinks.base import Reachable

    sink = build_sink(sink_config, clock=SystemClock(), version=__version__)
    try:
        if not isinstance(sink, Reachable):
            print(f"  sink {sink.name}: {sink_config.type} sinks cannot be checked without sending an event")
            return None
        print(f"  sink {sink.name}: {await sink.reach()}")
        return None
    except DeliveryError as exc:
        return str(exc)
    finally:
        await sink.aclose()


def cmd_status(args: argparse.Namespace) -> int:
    from watcher.config import state_path_of

    config: Config | None = None
    refused = None
    try:
        config = _load(args, secrets_required=False)
        state_path = config.state.path
    except ConfigError as exc:
        # The state is still worth showing: a daemon may be running on the configuration it loaded
        # before the file broke, and the operator needs to see it before fixing the file.
        found = state_path_of(args.config)
        if found is None:
            raise
        state_path, refused = found, f"{args.config}: {exc}"
        print(f"{PROG}: warning: the configuration does not load ({refused}); showing the state", file=sys.stderr)
    if config is not None and config.state.postgres is not None:
        missing = _no_state(config)
        if missing:
            print(f"{PROG}: {missing}", file=sys.stderr)
            report = {**_leadership_report(config.state.postgres), "streams": [], "sinks": [], "tracked_leads": 0}
        else:
            report = _status_report(state_path, config, refused)
        if missing and not args.json:
            return EXIT_OK
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_status(report)
        return EXIT_OK
    from watcher.lineage import refuse_lost_history

    refuse_lost_history(state_path, f"{PROG} run -c {args.config}")
    if not state_path.exists():
        # Opening would create the file, possibly owned by the wrong user: report instead.
        print(f"{PROG}: no state file at {state_path} yet (the daemon has not run)", file=sys.stderr)
        if args.json:
            print(
                json.dumps({"running": False, "role": None, "streams": [], "sinks": [], "tracked_leads": 0}, indent=2)
            )
        return EXIT_OK
    report = _status_report(state_path, config, refused)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    return EXIT_OK


def _status_report(state_path: Path, config: Config | None, refused: str | None) -> dict[str, Any]:
    """What `status` shows, as the JSON it prints with `--json`; the config is None when it does not load."""
    from watcher.delivery.policy import FAILING_ALERT_AFTER
    from watcher.lock import running_holder
    from watcher.state.store import Store, open_store_readonly

    postgres = config.state.postgres if config is not None else None
    # Read-only and never migrated: run between an upgrade and the restart, status must not touch
    # the file the old daemon still writes.
    store = Store.open_readonly(state_path) if config is None or postgres is None else open_store_readonly(config.state)
    secrets = known_secrets()
    now = SystemClock().now()
    try:
        # Every page, not only those the counts below read: a damaged lead snapshot must not pass
        # as "ok". Without matching indexes to tables it costs about 0.2 s per 100 MB (file cached).
        store.verify(quick=True)
        streams: list[dict[str, Any]] = [
            {
                "stream": c.stream,
                "cursor": c.cursor,
                "last_poll_at": _ts(c.last_poll_at) if c.last_poll_at else None,
                "last_success_at": _ts(c.last_success_at) if c.last_success_at else None,
                "last_poll_age_s": round(now - c.last_poll_at, 1) if c.last_poll_at else None,
                # Errors are stored as raised; they are scrubbed like log lines before anyone sees them.
                "last_error": scrub(c.last_error, secrets) if c.last_error else None,
                "polls": c.polls,
                # A walk under way (a snapshot baseline can take many polls' worth of pages).
                "walking": c.walk_from is not None,
                "pages_done": c.progress,
            }
            for c in store.cursors()
        ]
        unreadable = [
            {
                "stream": u.stream,
                "lead_id": u.lead_id,
                "first_seen": _ts(u.first_seen),
                "next_try": _ts(u.next_try),
                "tries": u.tries,
                "error": scrub(u.error, secrets) if u.error else None,
            }
            for u in store.unreadable()
        ]
        sinks: list[dict[str, Any]] = []
        # Unknown when the file does not load: then no sink is called stranded or "not in config".
        configured = {c.name: c for c in config.sinks} if config is not None else None
        for s in store.sink_states(list(configured or ())):
            failing = s.failing_since is not None and now - s.failing_since >= FAILING_ALERT_AFTER
            sink_config = configured.get(s.name) if configured is not None else None
            sinks.append(
                {
                    "sink": s.name,
                    "configured": None if configured is None else sink_config is not None,
                    # `enabled = false` in the configuration: nothing is queued or sent for it.
                    "off": sink_config is not None and not sink_config.enabled,
                    # Pending or dead events of a sink no longer configured: nothing will ever send them.
                    "stranded": configured is not None and s.stranded(configured),
                    "pending": s.pending,
                    "dead": s.dead,
                    "delivered": s.delivered,
                    "oldest_pending_age_s": round(now - s.oldest_pending_at, 1) if s.oldest_pending_at else None,
                    "last_success_at": _ts(s.last_success_at) if s.last_success_at else None,
                    "disabled": s.disabled_at is not None,
                    "disabled_reason": scrub(s.disabled_reason, secrets) if s.disabled_reason else None,
                    "failing_since": _ts(s.failing_since) if s.failing_since else None,
                    "failing": failing,
                }
            )
        leads = store.lead_count()
        forgotten = [{"lead_id": lead, "forgotten_at": _ts(at)} for lead, at in store.tombstones()]
    finally:
        store.close()
    if postgres is not None:
        return {
            **_leadership_report(postgres),
            "config_error": refused,
            "streams": streams,
            "sinks": sinks,
            "tracked_leads": leads,
            "unreadable_leads": unreadable,
            "forgotten_leads": forgotten,
            "daemon": None,
            "storage": {"free_bytes": None, "read_only": None, "problem": None},
        }
    holder = running_holder(state_path)
    return {
        # Whether a `run` or `once` holds the state file now: the lock, not the pid a file remembers.
        "running": holder is not None,
        # One writer per SQLite file: the one running is the leader.
        "role": "leader" if holder is not None else None,
        "holder": None
        if holder is None
        else {"pid": holder.pid, "command": holder.command, "host": holder.host, "since": holder.started_at},
        "config_error": refused,
        "streams": streams,
        "sinks": sinks,
        "tracked_leads": leads,
        "unreadable_leads": unreadable,
        "forgotten_leads": forgotten,
        "daemon": _daemon_info(state_path, config, holder.pid if holder is not None else None),
        "storage": _storage(state_path),
    }


def _leadership_report(postgres: PostgresState) -> dict[str, Any]:
    """Who leads a PostgreSQL state and who stands by, read from its leadership tables (no lock taken).

    `running`: some daemon takes part (leading or standing by); `role`: "leader" while one leads,
    "standby" while daemons run and none leads (a takeover under way), None when none runs.
    """
    import psycopg

    from watcher.leadership import describe, read_status
    from watcher.state.postgres import conninfo_for

    try:
        with psycopg.connect(conninfo_for(postgres, None), autocommit=True) as conn:
            # The configured lease: a member unseen for MEMBER_GONE_AFTER of them is no longer listed.
            status = read_status(conn, postgres.schema, postgres.timings)
    except psycopg.Error as exc:
        raise StateError(f"cannot read who leads the state in {postgres.shown()}: {describe(exc)}") from None
    leader = status.leader
    running = leader is not None or bool(status.standbys)
    return {
        "running": running,
        "role": "leader" if leader is not None else ("standby" if running else None),
        "holder": None
        if leader is None
        else {"pid": leader.pid, "command": None, "host": leader.host, "since": leader.since.isoformat()},
        "leadership": status.as_json(),
    }


def _print_status(report: dict[str, Any]) -> None:
    print(f"{'STREAM':<16} {'CURSOR':<26} {'LAST POLL':<10} {'POLLS':>6}  ERROR")
    for st in report["streams"]:
        age = f"{int(st['last_poll_age_s'])}s ago" if st["last_poll_age_s"] is not None else "never"
        note = st["last_error"] or ""
        if st["walking"] and st["pages_done"]:
            note = f"walk under way: {st['pages_done']} pages read. {note}".strip()
        print(f"{st['stream']:<16} {(st['cursor'] or '-')[:26]:<26} {age:<10} {st['polls']:>6}  {note}")
    print()
    print(f"{'SINK':<16} {'PENDING':>8} {'DEAD':>6} {'OLDEST':>7}  {'LAST SUCCESS':<26} STATE")
    for sk in report["sinks"]:
        state = "off" if sk["off"] else "disabled" if sk["disabled"] else ("FAILING" if sk["failing"] else "ok")
        if sk["stranded"]:
            state = "STRANDED (not in config): move with replay --sink NEW --from-sink " + sk["sink"]
        elif sk["configured"] is False:
            state += " (not in config)"
        oldest = f"{int(sk['oldest_pending_age_s'])}s" if sk["oldest_pending_age_s"] is not None else "-"
        print(
            f"{sk['sink']:<16} {sk['pending']:>8} {sk['dead']:>6} {oldest:>7}  "
            f"{sk['last_success_at'] or '-':<26} {state}"
        )
    print(f"\n{report['tracked_leads']} leads tracked")
    storage, daemon, holder = report["storage"], report["daemon"], report["holder"]
    if storage["problem"]:
        print(f"STATE FILE: {storage['problem']}")
    if report["config_error"]:
        print(f"CONFIG: does not load, so sinks are listed from the state alone: {report['config_error']}")
    if "leadership" in report:
        leadership = report["leadership"]
        leader = leadership["leader"]
        if leader is None:
            print("leader: none (no daemon leads the state now)")
        else:
            print(f"leader: pid {leader['pid']} on {leader['host']}, epoch {leader['epoch']}, since {leader['since']}")
        for standby in leadership["standbys"]:
            print(f"standing by: pid {standby['pid']} on {standby['host']} (seen {standby['seen_at']})")
    elif holder is None:
        print("daemon: not running (no process holds the state file)")
    elif daemon is None:
        print(f"daemon: running, pid {holder['pid']} ({holder['command']}) on {holder['host']} since {holder['since']}")
    else:
        changed = " (the file has changed since: send SIGHUP to apply it)" if daemon["config_changed"] else ""
        print(f"daemon: running, pid {holder['pid']} on {holder['host']} since {holder['since']}")
        print(
            f"config loaded {daemon['config_loaded_at']} fingerprint {daemon['config_fingerprint']}, "
            f"{daemon['reloads']} reloads{changed}"
        )
        if daemon.get("reload_refused"):
            print(f"last reload REFUSED at {daemon['reload_refused_at']}: {daemon['reload_refused']}")
    for u in report["unreadable_leads"]:
        print(
            f"lead {u['lead_id']} unreadable ({u['stream']}): {u['tries']} tries since {u['first_seen']}, "
            f"next {u['next_try']}: {u['error'] or ''}"
        )
    for f in report["forgotten_leads"]:
        print(f"lead {f['lead_id']} forgotten at {f['forgotten_at']} (a tombstone: never announced again)")


# Less free space than this, and a page of leads or an outcome may not fit.
LOW_SPACE = 1 << 20


def _storage(path: Path) -> dict[str, Any]:
    """Whether the state file's folder can take writes: its free space and a read-only mount.

    A daemon whose disk is full cannot record why, so `status` looks at the folder itself.
    """
    folder = path.parent
    try:
        st = os.statvfs(folder)
    except OSError as exc:
        return {"free_bytes": None, "read_only": None, "problem": f"cannot inspect {folder}: {exc.strerror}"}
    free = st.f_bavail * st.f_frsize
    read_only = bool(st.f_flag & os.ST_RDONLY)
    problem = None
    if read_only:
        problem = f"{folder} is read-only: the daemon cannot record anything; polls pause until it is writable"
    elif free < LOW_SPACE:
        problem = f"{folder} is full ({free} bytes free): polls pause and outcomes wait in memory until space returns"
    return {"free_bytes": free, "read_only": read_only, "problem": problem}


def _daemon_info(state_path: Path, config: Config | None, pid: int | None) -> dict[str, Any] | None:
    """What the running daemon wrote about its configuration, and whether the file on disk differs.

    None unless that daemon still runs: a stopped one's record would read as live advice.
    """
    from watcher.config import file_digest
    from watcher.runinfo import config_fingerprint, read_info

    info = read_info(state_path)
    if info is None or pid is None or info.get("pid") != pid:
        return None
    changed: bool | None
    if config is not None and not config.unresolved:
        # Every secret readable here too: rotated credential files count as a change.
        changed = info.get("fingerprint") != config_fingerprint(config)
    elif "config_digest" in info:
        # The file's bytes alone, as the daemon read them at its last successful load.
        path = Path(str(info.get("config_path") or "")) if config is None else config.path
        changed = info["config_digest"] != file_digest(path)
    else:
        changed = None  # a daemon of an older release, which wrote no digest: unknown, not "changed"
    refused = info.get("reload_refused")
    return {
        "pid": info.get("pid"),
        "config_loaded_at": _ts(info.get("loaded_at")),
        "config_fingerprint": info.get("fingerprint"),
        "config_changed": changed,
        "reloads": info.get("reloads", 0),
        "reload_refused": scrub(str(refused), known_secrets()) if refused else None,
        "reload_refused_at": _ts(info.get("reload_refused_at")) if refused else None,
    }


def _no_state(config: Config) -> str | None:
    """Why there is no state to change yet (no file; on PostgreSQL, no schema a daemon made), or None."""
    from watcher.state.store import open_store_readonly

    if config.state.postgres is None:
        return None if config.state.path.exists() else f"no state file at {config.state.path}"
    try:
        open_store_readonly(config.state).close()
    except StateTooNew:
        raise
    except StateError as exc:
        return str(exc)
    return None


def cmd_forget(args: argparse.Namespace) -> int:
    """An erasure request: the lead's snapshot, payloads and attempt log go; a tombstone stays."""
    from watcher.state.store import open_store

    config = _load(args, secrets_required=False)
    missing = _no_state(config)
    if missing:
        return _fail(f"forget: {missing}", EXIT_FAILURE)
    # No write lock, like replay: one short transaction that a running daemon serialises with.
    with open_store(config.state) as store:
        erased = store.forget(args.lead, SystemClock().now(), unseen=args.unseen)
    if erased is None:
        return _fail(
            f"forget: the state holds nothing about lead {args.lead} (a mistyped id, or one not polled yet); "
            "nothing erased. For a lead not yet polled, --unseen records a tombstone that keeps it from ever "
            "being announced",
            EXIT_FAILURE,
        )
    print(
        f"lead {args.lead} forgotten: {erased['events']} events, {erased['deliveries']} deliveries and "
        f"{erased['attempts']} attempt-log rows erased; a bare tombstone keeps it from being announced again"
    )
    return EXIT_OK


def _copy_target(args: argparse.Namespace, config: Config) -> tuple[StateConfig, str]:
    """The state `copy-state` writes (`--to` / `--to-env`) and how to name it: never the URL itself."""
    from watcher.config import default_schema, postgres_state, schema_name_ok

    if args.to_env is not None:
        target = os.environ.get(args.to_env, "")
        if not target:
            raise ConfigError(f"--to-env {args.to_env}", "that environment variable is not set or empty")
        key = f"--to-env {args.to_env}"
    else:
        target, key = args.to, "--to"
    if not target.lower().startswith(("postgresql:", "postgres:")):
        if args.schema is not None:
            raise ConfigError("--schema", "only with a PostgreSQL target")
        path = Path(target).absolute()
        return StateConfig(path=path), f"state file {path}"
    current = config.state.postgres.schema if config.state.postgres is not None else None
    schema = args.schema or current or default_schema(config.convertr.base_url)
    if not schema_name_ok(schema):
        raise ConfigError(
            "--schema", "must be a lower-case SQL name: letters, digits and '_', at most 63, not starting pg_"
        )
    pg = postgres_state(target, key, schema)
    return StateConfig(path=Path(), postgres=pg), pg.shown()


def _source_led(postgres: PostgresState) -> None:
    """StateLocked while a daemon leads the PostgreSQL state (a live lease)."""
    leader = _leadership_report(postgres)["holder"]
    if leader is not None:
        raise StateLocked(
            f"the state in {postgres.shown()} is led by a running daemon (pid {leader['pid']} on {leader['host']}, "
            f"since {leader['since']}): stop it before copying the state"
        )


def cmd_copy_state(args: argparse.Namespace) -> int:
    """The whole state into a new, empty state on another backend (or another file or schema)."""
    from contextlib import ExitStack

    from watcher.lock import state_lock
    from watcher.state.copy import TargetNotEmpty, copy_state
    from watcher.state.store import open_store, open_store_readonly

    config = _load(args, secrets_required=False)
    try:
        target, shown = _copy_target(args, config)
    except ConfigError as exc:
        return _fail(f"copy-state: {exc}", EXIT_CONFIG)
    command = f"{PROG} {args.command} -c {os.path.abspath(args.config)}"
    with ExitStack() as stack:
        # The source's writers are kept out for the whole copy (SQLite: its write lock, taken here so a
        # daemon starting meanwhile refuses; PostgreSQL: no leader now, and one snapshot is read).
        if config.state.postgres is None:
            stack.enter_context(state_lock(config.state.path, command))
        else:
            _source_led(config.state.postgres)
        if target.postgres is None:
            if target.path == config.state.path.absolute():
                return _fail(f"copy-state: the target {shown} is the source itself", EXIT_CONFIG)
            stack.enter_context(state_lock(target.path, command))
        source = stack.enter_context(open_store_readonly(config.state))
        into = stack.enter_context(open_store(target))
        try:
            copied = copy_state(source, into)
        except TargetNotEmpty as exc:
            return _fail(f"copy-state: {exc}", EXIT_CONFIG)
    rows = copied.rows
    print(
        f"copied the state to {shown}: {rows['events']} events, {rows['deliveries']} deliveries, "
        f"{rows['attempts']} attempt-log rows, {rows['leads']} lead snapshots, {rows['cursors']} cursors"
    )
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from watcher.state.admin import Selection
    from watcher.state.records import DEAD, DELIVERED
    from watcher.state.store import open_store

    config = _load(args, secrets_required=False)
    names = {s.name for s in config.sinks}
    for name in args.sink or []:
        if name not in names:
            return _fail(f"--sink: no sink named {name!r} in {args.config}", EXIT_CONFIG)
    if args.from_sink is not None and len(args.sink or []) != 1:
        return _fail("replay: --from-sink OLD needs exactly one --sink NEW to move the events to", EXIT_USAGE)
    if args.from_sink is not None and args.from_sink in (args.sink or []):
        return _fail("replay: --from-sink and --sink name the same sink", EXIT_USAGE)
    if args.from_sink is not None and args.from_sink in names:
        # A running daemon may be sending its rows right now: moving them would send them twice.
        return _fail(f"replay: --from-sink {args.from_sink} is still configured; remove or rename it first", EXIT_USAGE)
    chosen = args.sink or args.event or args.since is not None or args.until is not None or args.all
    if not (chosen or args.pending or args.from_sink):
        return _fail("replay: say what to re-queue: --sink, --event, --since/--until, --pending, or --all", EXIT_USAGE)
    missing = _no_state(config)
    if missing:
        # Opening would create an empty file (owned by whoever ran this, maybe root): nothing to replay.
        return _fail(f"replay: {missing} (the daemon has not run yet)", EXIT_FAILURE)
    statuses = [DEAD, DELIVERED] if args.delivered else [DEAD]
    now = SystemClock().now()
    # No write lock: a replay is one short transaction that a running daemon is meant to pick up
    # (it is how a fixed receiver gets its backlog without a restart); SQLite serialises it with
    # the daemon's own writes. Only processes that poll and deliver must be alone.
    with open_store(config.state) as store:
        # Without --sink, only configured sinks: a removed sink's queue is read by nothing.
        enabling = args.sink or ([] if args.pending else sorted(names))
        disabled = [s for s in store.sink_states(enabling, only=True) if s.disabled_at is not None]
        if args.from_sink is not None:
            from watcher.routing import wants

            target = next(s for s in config.sinks if s.name == args.sink[0])
            moved, left = store.move_sink(args.from_sink, target.name, now, lambda event: wants(target, event))
            store.enable_sinks(args.sink)
            print(f"moved {moved} deliveries from {args.from_sink} to {target.name} (same event ids)")
            if left:
                print(
                    f"{left} stay under {args.from_sink}: {target.name} does not take them "
                    "(its events, campaign_ids or include_pii) or already has them"
                )
            _say_enabled(disabled)
            return EXIT_OK
        if args.pending:
            count = store.make_due(now, Selection(args.sink or (), args.event or (), args.since, args.until))
            if args.sink:
                store.enable_sinks(args.sink)
            print(f"made {count} waiting deliveries due now (same ids and attempt counts)")
            _say_enabled(disabled)
            return EXIT_OK
        chosen = Selection(enabling, args.event or (), args.since, args.until)
        count = store.replay(now, chosen, statuses)
        stranded = [s for s in store.sink_states(names) if s.stranded(names)]
    print(f"re-queued {count} deliveries")
    _say_enabled(disabled)
    for s in stranded:
        print(
            f"sink {s.name} is no longer configured and holds {s.pending} pending and {s.dead} dead deliveries: "
            f"move them with `replay --sink NEW --from-sink {s.name}`"
        )
    return EXIT_OK


def _say_enabled(disabled: Sequence[Any]) -> None:
    """Name each sink a replay enabled again: the daemon had stopped sending to it after a refusal."""
    secrets = known_secrets()
    for s in disabled:
        why = scrub(s.disabled_reason or "a refusal", secrets)
        print(
            f"sink {s.name} was disabled by the daemon since {_ts(s.disabled_at)} ({why}): enabled again, "
            "its pending events go out in order"
        )


def cmd_send_test(args: argparse.Namespace) -> int:
    from watcher.sendtest import send_test

    config = _load(args)
    try:
        sink = config.sink(args.sink)
    except KeyError:
        return _fail(f"--sink: no sink named {args.sink!r} in {args.config}", EXIT_CONFIG)
    if not sink.enabled:
        print(f"sink {sink.name} is disabled in the configuration (enabled = false): the daemon sends it nothing")
    refused = _disabled_in_state(config).get(sink.name)
    if refused is not None:
        print(f"sink {sink.name} is DISABLED by the daemon {refused}; `replay --sink {sink.name}` enables it")
    if args.type != WATCHER_TEST and args.type not in sink.events:
        print(f"sink {sink.name} does not take {args.type} events (its `events`): the daemon never sends it one")
    ok, line = asyncio.run(send_test(sink, SystemClock(), args.type))
    print(line)
    return EXIT_OK if ok else EXIT_FAILURE


def cmd_new_secret(args: argparse.Namespace) -> int:
    from watcher.signing import new_secret

    print(new_secret())
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from watcher.simulator import DEFAULT_PASSWORD, run_simulator

    # The default login is public test data; a password the user chose is theirs and is not echoed.
    shown = args.password if args.password == DEFAULT_PASSWORD else "the password given"
    print(f"Convertr API simulator on http://127.0.0.1:{args.port} (login {args.username} / {shown})", flush=True)
    run_simulator(
        args.port,
        args.seed,
        args.username,
        args.password,
        campaigns=args.campaigns,
        leads=args.leads,
        rate_limit=not args.no_rate_limit,
        timezone=args.timezone,
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from watcher.demo import run_demo

    return run_demo(duration=args.duration, seed=args.seed, rate=args.rate)


def cmd_events(args: argparse.Namespace) -> int:
    from watcher.listing import Query, follow, read, show, write

    if args.show and (len(args.show) != 2 or args.show[0] != "show"):
        return _fail("events: the only action is `events -c FILE show EVENT_ID`", EXIT_USAGE)
    config = _load(args, secrets_required=False)
    # Read-only (SQLite mode=ro): safe beside a running daemon, and never creates or migrates the file.
    if args.show:
        found = show(config.state, args.show[1])
        if found is None:
            where = config.state.postgres.shown() if config.state.postgres is not None else config.state.path
            return _fail(f"events show: no event {args.show[1]!r} in {where}", EXIT_FAILURE)
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return EXIT_OK
    query = Query(
        sinks=args.sink or (),
        statuses=[args.status] if args.status else (),
        types=args.type or (),
        lead=args.lead,
        since=args.since,
        limit=args.limit,
        attempts=args.attempts,
    )
    if args.follow:
        follow(config.state, query, args.format)
        return EXIT_OK
    write(read(config.state, query), args.format)
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from watcher.simulator import DEFAULT_PASSWORD, DEFAULT_PORT, DEFAULT_USERNAME
    from watcher.simulator.admin import ADMIN_HEADER, describe_routes

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Watch a Convertr enterprise for new and changed leads and campaign status changes, "
        "and deliver each change as a signed webhook or a Slack message.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("-c", "--config", required=True, metavar="FILE", help="the TOML configuration file")
        return p

    start_over = "take a fresh baseline on a state file that lost its history (the daemon refuses it otherwise)"
    p = with_config("run", "run the daemon: poll and deliver until SIGTERM/SIGINT, then exit 0")
    p.add_argument("--start-over", action="store_true", help=start_over)
    p.set_defaults(func=cmd_run)
    p = with_config("once", "poll every enabled stream once, make one delivery pass, exit (0 when all succeeded)")
    p.add_argument("--start-over", action="store_true", help=start_over)
    p.set_defaults(func=cmd_once)
    p = with_config("check", "validate the configuration (exit 0 valid, 78 invalid)")
    p.add_argument("--connect", action="store_true", help="also log in to Convertr and read one lead")
    p.add_argument(
        "--state",
        action="store_true",
        help="also check the state, read-only: SQLite's integrity check and its history on a state file; "
        "on PostgreSQL that it answers, its schema version and who leads",
    )
    p.set_defaults(func=cmd_check)
    p = with_config("status", "show cursors, last polls and per-sink outbox counts")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(func=cmd_status)
    p = with_config(
        "replay", "re-queue dead (or delivered) events, retry waiting ones now, or move a removed sink's queue"
    )
    p.add_argument("--sink", action="append", metavar="NAME", help="only this sink (repeatable); also re-enables it")
    p.add_argument("--event", action="append", metavar="ID", help="only this event id (repeatable)")
    p.add_argument(
        "--since",
        type=_time_arg,
        metavar="TIME",
        help="events detected at or after this RFC 3339 time or this long ago (1h, 2d)",
    )
    p.add_argument(
        "--until",
        type=_time_arg,
        metavar="TIME",
        help="events detected before this RFC 3339 time or this long ago (1h, 2d)",
    )
    p.add_argument("--all", action="store_true", help="every dead event of every sink")
    p.add_argument("--delivered", action="store_true", help="also re-queue events already delivered")
    p.add_argument(
        "--pending",
        action="store_true",
        help="make deliveries waiting out a retry delay due now (same ids and attempt counts)",
    )
    p.add_argument(
        "--from-sink",
        metavar="OLD",
        help="move the pending and dead events of sink OLD (renamed or removed) to the one --sink",
    )
    p.set_defaults(func=cmd_replay)
    p = with_config("events", "list the outbox: each event and sink with status, attempts, times and last error")
    p.add_argument("--sink", action="append", metavar="NAME", help="only this sink (repeatable)")
    p.add_argument("--status", choices=("pending", "delivered", "dead"), help="only deliveries in this state")
    p.add_argument(
        "--type", action="append", choices=EVENT_TYPES, metavar="TYPE", help="only this event type (repeatable)"
    )
    p.add_argument("--lead", type=int, metavar="ID", help="only events about this lead")
    p.add_argument(
        "--since",
        type=_time_arg,
        metavar="TIME",
        help="events detected at or after this RFC 3339 time or this long ago (1h, 2d)",
    )
    p.add_argument("--limit", type=_positive, metavar="N", help="at most N rows, most recently detected first")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format (default table)")
    p.add_argument("--attempts", action="store_true", help="add each delivery's attempt log with the answer's start")
    p.add_argument(
        "--follow",
        action="store_true",
        help="keep printing: each delivery of a newer event as it appears and whenever it changes (Ctrl-C ends)",
    )
    p.add_argument(
        "show",
        nargs="*",
        metavar="show ID",
        help="print one event: its body without personal data, secrets masked, and its deliveries",
    )
    p.set_defaults(func=cmd_events)
    p = with_config("send-test", "send a watcher.test event through the real delivery path (exit 0 on a 2xx)")
    p.add_argument("--sink", required=True, metavar="NAME", help="the sink to test")
    p.add_argument(
        "--type",
        choices=EVENT_TYPES,
        default=WATCHER_TEST,
        metavar="TYPE",
        help="send a realistic sample of this event type instead (a new id each time; made-up lead and campaign)",
    )
    p.set_defaults(func=cmd_send_test)
    p = sub.add_parser(
        "new-secret",
        help="print a new webhook signing secret (whsec_ and 32 random bytes in base64)",
        description="Print a new webhook signing secret, whsec_ followed by 32 random bytes in base64, for a "
        "sink's secret and its receiver. Several, separated by spaces, sign together while keys rotate.",
    )
    p.set_defaults(func=cmd_new_secret)
    p = with_config("forget", "erase one lead's personal data from the state file, keeping a bare tombstone")
    p.add_argument("--lead", required=True, type=int, metavar="ID", help="the Convertr lead id")
    p.add_argument(
        "--unseen",
        action="store_true",
        help="the state has never seen this lead (not polled yet): record the tombstone anyway",
    )
    p.set_defaults(func=cmd_forget)
    p = with_config(
        "copy-state",
        "copy the whole state into a new, empty state: SQLite to PostgreSQL or back (refused while a daemon runs)",
    )
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", metavar="TARGET", help="a new SQLite file's path, or a postgresql:// URL")
    to.add_argument("--to-env", metavar="NAME", help="the environment variable holding the target URL or path")
    p.add_argument(
        "--schema",
        metavar="NAME",
        help="the PostgreSQL target's schema (default: the configured one, else convertr_<enterprise>)",
    )
    p.set_defaults(func=cmd_copy_state)

    p = sub.add_parser(
        "simulate",
        help="run the built-in Convertr API simulator on 127.0.0.1",
        description="Run the built-in Convertr API v4 simulator on 127.0.0.1 (for trying the daemon and "
        "building receivers without Convertr access).",
        epilog="admin API, JSON in and out, loopback only; a call that changes anything must send "
        f"Content-Type: application/json or {ADMIN_HEADER}: 1:\n{describe_routes()}\n\n"
        f"example:\n  curl -X POST -H 'Content-Type: application/json' -d '{{\"campaign_id\": 601}}' "
        f"http://127.0.0.1:{DEFAULT_PORT}/_sim/leads",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated data (default 0)")
    p.add_argument("--username", default=DEFAULT_USERNAME, help=f"login accepted (default {DEFAULT_USERNAME})")
    p.add_argument("--password", default=DEFAULT_PASSWORD, help=f"password accepted (default {DEFAULT_PASSWORD})")
    p.add_argument("--campaigns", type=int, default=5, help="campaigns to generate (default 5)")
    p.add_argument("--leads", type=int, default=50, help="leads to generate (default 50)")
    p.add_argument("--timezone", default="Europe/London", help="server time zone (default Europe/London)")
    p.add_argument("--no-rate-limit", action="store_true", help="turn off Convertr's rolling rate limit")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "demo",
        help="simulator + daemon + a verifying receiver on loopback; exit 0 when no event is missing",
        description="Run the simulator, the daemon and a signature-verifying receiver on loopback for "
        "--duration seconds, print each verified event, then a summary. Exit 0 when no event is missing.",
    )
    p.add_argument("--duration", type=float, default=30.0, help="seconds to run (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed for the simulated data (default 0)")
    p.add_argument("--rate", type=float, default=4.0, help="new leads per second (default 4)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        where = getattr(args, "config", "")
        # A problem with the file itself already starts with its path.
        return _fail(str(exc) if str(exc).startswith(f"{where}: ") else f"{where}: {exc}", EXIT_CONFIG)
    except AuthError as exc:
        return _fail(f"convertr: {exc}", EXIT_CONFIG)
    except StateLocked as exc:
        return _fail(str(exc), EXIT_LOCKED)
    except (StateTooNew, StateDamaged, StateLost) as exc:
        # Like a bad config, only the operator can fix it (an upgrade, a recovery, a choice): 78 stops
        # systemd's restarts.
        return _fail(str(exc), EXIT_CONFIG)
    except StateError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except WatcherError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `status | head`: the reader left. Point stdout at /dev/null so the final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
