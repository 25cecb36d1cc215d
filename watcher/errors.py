"""Every error the project raises, under one root.

    WatcherError
    ├── ConfigError          the configuration is invalid (CLI exit 78)
    ├── StateError           the state file cannot be opened, migrated or written: `run` pauses
    │   │                    and retries (a full disk passes), `once` and the other commands exit 1
    │   ├── StateLocked      another process holds the state file's write lock (CLI exit 75)
    │   ├── StateTooNew      the state file was written by a newer release (CLI exit 78)
    │   ├── StateDamaged     SQLite finds the file corrupt: `run` refuses it at start (CLI exit 78)
    │   │                    and stops polling if it breaks while running
    │   ├── StateLost        the evidence beside the file says it had history, the file has none
    │   │                    (its -wal deleted, a wrong backup): refused unless --start-over (78)
    │   └── Deposed          PostgreSQL state: another daemon leads now (the write transaction's
    │                        fencing epoch is not ours); rolled back, this daemon stops work and stands by
    ├── ConvertrError        the Convertr API did not give what was asked
    │   ├── AuthError        Convertr's own OAuth2 refusal (invalid_grant-style JSON), an expired
    │   │                    password or an MFA challenge: fatal, never retried
    │   ├── TransientError   connection trouble, timeouts, 429, 502/503/504, and a 400/401/403 whose
    │   │                    body is not Convertr's JSON (a proxy's page): retried with backoff
    │   │   ├── RateLimited  429: carries the server's Retry-After
    │   │   ├── ResponseTooLarge  a body past [convertr] max_response_bytes once decoded: the
    │   │   │                rest is never read (a gzip bomb costs the ceiling, not its size)
    │   │   ├── ServerFault  500: the server failed, maybe on one record (walks narrow the page)
    │   │   └── MalformedResponse  a 2xx whose body is not the JSON document expected
    │   └── ApiError         any other non-2xx answer: not retried
    │       └── NotFound     404: no such item (or not visible to this user)
    └── DeliveryError        one delivery attempt failed: retried on the sink's schedule
        ├── Throttled        429 (or 503) with Retry-After: the next attempt waits at least that long
        ├── SinkGone         410, or a permanent Slack error: the sink is disabled, its events kept
        └── Interrupted      a stop or reload cut the attempt off: logged, sent again, schedule untouched

Retry decisions branch on these classes, never on status codes elsewhere in the code.
Messages never carry secrets: translate at the boundary with what the operator needs (status,
path, reason) and nothing else.
"""

from __future__ import annotations


class WatcherError(Exception):
    """Root of every error raised on purpose by convertr-watcher."""


class ConfigError(WatcherError):
    """The configuration is invalid; the message starts with the key path."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class StateError(WatcherError):
    """The SQLite state file cannot be opened, migrated or written.

    The daemon treats it as passing (a full disk, a read-only remount): polls pause and retry,
    outcomes wait in memory, health goes red. Only its subclasses below end a command at once.
    """

    read_only = False  # set where SQLite said the file or its folder cannot be written


class StateLocked(StateError):
    """Another process holds the state file's write lock; the message names the file and the holder."""


class StateTooNew(StateError):
    """The state file's schema is newer than this release knows: a restart cannot fix it, an upgrade can.

    Exit 78 rather than 1, so systemd's RestartPreventExitStatus stops the unit instead of
    restarting a daemon that can never open the file.
    """

    def __init__(self, message: str, *, needs: int, knows: int) -> None:
        self.needs = needs
        self.knows = knows
        super().__init__(message)


class StateDamaged(StateError):
    """SQLite reports the state file corrupt (or not a database): waiting cannot mend it, an operator can.

    Exit 78 like StateTooNew: a restart loop would only repeat the refusal.
    """


class StateLost(StateError):
    """The state file has no history although the marker beside it says it had (see watcher.lineage)."""


class Deposed(StateError):
    """Another daemon has taken the lease over: this one's write transaction was refused and rolled back.

    Raised by watcher.leadership.fence inside a write transaction, and by the leadership loop when
    a renewal finds another epoch. Not retried as it is: the runtime stops polling and delivering
    and goes back to standing by (a StateError, so code that only knows the root pauses, and any
    retry is refused by the fence again: nothing is written either way).
    """

    def __init__(self, message: str, *, epoch: int | None, current: int | None) -> None:
        self.epoch = epoch  # the epoch this daemon led under
        self.current = current  # the one the database holds now (None: no lease row)
        super().__init__(message)


class ConvertrError(WatcherError):
    """The Convertr API did not answer as asked."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class AuthError(ConvertrError):
    """Login was refused or the password has expired; retrying cannot help."""


class TransientError(ConvertrError):
    """A failure that may pass by itself: retried with backoff."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class RateLimited(TransientError):
    """Convertr answered 429; `retry_after` holds its wait in seconds when it gave one."""


class ServerFault(TransientError):
    """Convertr answered 500: a passing fault, or a record on the page it cannot serialise."""


class MalformedResponse(TransientError):
    """A successful status with a body that is not the expected JSON document."""


class ResponseTooLarge(TransientError):
    """An answer whose body, decoded, passes `[convertr] max_response_bytes`; it is not read further.

    Transient rather than fatal: it is more likely a proxy's accident than Convertr's own
    page, and the cap keeps each retry as cheap as the first.
    """


class ApiError(ConvertrError):
    """A non-2xx answer that retrying will not change (400, 403, 404, ...)."""


class NotFound(ApiError):
    """404: the item does not exist or is not visible to this user."""


class DeliveryError(WatcherError):
    """One delivery attempt to a sink failed; the outbox schedules the next one."""

    # The start of the receiver's answer, set where one was read: kept in the attempt log, never in
    # the message, which goes to logs and may not carry what a receiver echoes back.
    excerpt: str = ""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class Throttled(DeliveryError):
    """The receiver asked us to slow down (429, or 503 with Retry-After)."""


class SinkGone(DeliveryError):
    """The receiver said it will never accept these events (410, revoked Slack hook): disable the sink."""


class Interrupted(DeliveryError):
    """A stop or a reload cut the attempt off before an answer: the receiver may have read it, so
    it is a row in the attempt log, but not the event's fault: it goes again without using up a
    step of its schedule."""
