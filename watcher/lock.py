"""One writer per state file: an exclusive `flock` on a sidecar `<state>.lock`, held for a command's life.

Two daemons on one state file both deliver every event, so a second writer must refuse to start.
SQLite's own locks cannot say that: they last one transaction, and two processes simply take
turns. The lock is on a separate file so that it can carry the holder's record and never meddles
with SQLite's locking of the database and its WAL.

The kernel drops a `flock` when the last descriptor of the open file goes, so a holder that
crashes or is SIGKILLed leaves no stale lock: the file stays, the lock does not. For the same
reason the file is never deleted: unlinking it while a starter has it open would let two
processes each lock a different inode under one name.

`run` and `once` hold it: they poll and deliver. `replay` does not: it is one short transaction
the running daemon is meant to pick up. `status` and `check` only read; `status` asks whether a
writer holds the lock now (`running_holder`).

The holder writes who it is into the file (pid, command, host, start time) so that a refused
writer can name it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from watcher.errors import StateError, StateLocked

LOCK_SUFFIX = ".lock"
# Longer than any record we write: a partly written or foreign file is read no further.
RECORD_LIMIT = 4096


def lock_path(state_path: Path) -> Path:
    """The sidecar lock file of a state file: `state.db` → `state.db.lock`, in the same folder."""
    return state_path.with_name(state_path.name + LOCK_SUFFIX)


@dataclass(frozen=True)
class Holder:
    """Who holds a state file's lock, as the holder recorded it."""

    pid: int
    command: str
    host: str
    started_at: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command}) on {self.host} since {self.started_at}"

    def record(self) -> bytes:
        return (json.dumps(self.__dict__, ensure_ascii=True) + "\n").encode()

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder in a lock file's first line; None for an empty, half-written or foreign file."""
        try:
            fields = json.loads(raw.split(b"\n", 1)[0])
            return cls(int(fields["pid"]), str(fields["command"]), str(fields["host"]), str(fields["started_at"]))
        except (ValueError, KeyError, TypeError):
            return None


def current_holder(command: str) -> Holder:
    started = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return Holder(os.getpid(), command, socket.gethostname(), started)


def read_holder(state_path: Path) -> Holder | None:
    """The recorded holder of a state file's lock (which may have ended since), or None."""
    try:
        with lock_path(state_path).open("rb") as f:
            return Holder.parse(f.read(RECORD_LIMIT))
    except OSError:
        return None


def running_holder(state_path: Path) -> Holder | None:
    """The process holding the state file's lock right now, or None when no `run` or `once` does.

    The record alone cannot tell: it stays after its writer ends. So this asks the kernel, with a
    shared lock taken and dropped at once; it never creates the file. A writer starting in that
    instant retries (see `state_lock`), so the probe cannot make it refuse to start.
    """
    try:
        fd = os.open(lock_path(state_path), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(os.pread(fd, RECORD_LIMIT, 0))
            return holder or Holder(0, "a process that is starting up", "?", "?")
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


@contextmanager
def state_lock(state_path: Path, command: str) -> Iterator[Holder]:
    """Hold the state file's write lock for the block; StateLocked at once if another process holds it.

    `command` is how the holder is named to a refused writer, such as `convertr-watcher run -c FILE`.
    """
    path = lock_path(state_path)
    fd = _open(path)
    try:
        try:
            _lock_exclusive(fd)
        except BlockingIOError:
            holder = Holder.parse(os.pread(fd, RECORD_LIMIT, 0))
            # The holder writes its record just after locking: an empty file means it is starting.
            who = holder.describe() if holder else "another process that is starting up"
            raise StateLocked(
                f"state file {state_path} is in use by {who}; one process may write it at a time: "
                "stop that one or wait for it to finish"
            ) from None
        except OSError as exc:
            raise StateError(f"cannot lock state file {state_path} ({path}): {exc.strerror or exc}") from None
        me = current_holder(command)
        _record(fd, me)
        yield me
    finally:
        # Closing the only descriptor releases the lock; the file stays for the next writer.
        os.close(fd)


# A `status` probe holds a shared lock for microseconds; a writer that meets one tries again
# within this long before it concludes that another writer holds the file.
PROBE_GRACE = 0.25


def _lock_exclusive(fd: int) -> None:
    """LOCK_EX without blocking; BlockingIOError when another writer holds it (a probe is waited out)."""
    deadline = time.monotonic() + PROBE_GRACE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            # The record cannot tell a writer from a probe: it outlives the writer that wrote it.
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.01)


def _open(path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        raise StateError(f"state directory {path.parent} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(f"lock file {path} is a symbolic link; remove it") from None
        raise StateError(f"cannot open lock file {path}: {exc.strerror or exc}") from None
    _follow_folder_owner(fd, path.parent)
    return fd


def _follow_folder_owner(fd: int, folder: Path) -> None:
    """Give a lock file root created (`sudo convertr-watcher once`) to the state folder's owner.

    Left root-owned and 0600, the service's own user could not open it again, and the daemon
    would fail at every start until someone found the file.
    """
    if os.geteuid() != 0:
        return
    try:
        folder_stat = os.stat(folder)
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (folder_stat.st_uid, folder_stat.st_gid):
            os.fchown(fd, folder_stat.st_uid, folder_stat.st_gid)
    except OSError:
        # Not fatal here: the command that runs as root can still use the file.
        pass


def _record(fd: int, holder: Holder) -> None:
    """Write the holder into the lock file; a refused writer reads it to name us."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.record(), 0)
    except OSError:
        # A full disk must not stop the holder: the lock itself is held either way, and a
        # refused writer then says only that another process holds it.
        pass
