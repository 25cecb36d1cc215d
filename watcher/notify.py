"""The sd_notify protocol: readiness, status, watchdog and stop messages to systemd.

One datagram per message on the AF_UNIX socket named by $NOTIFY_SOCKET (a leading '@' means
the abstract namespace). Outside systemd the variable is unset and every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

# Ping the watchdog at this fraction of WATCHDOG_USEC: systemd's own advice is "half", and the
# margin below it absorbs event-loop jitter.
WATCHDOG_FRACTION = 0.45


def _address(raw: str) -> str | None:
    """The socket address for a NOTIFY_SOCKET value, or None when unusable."""
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    return None


def _field(value: object) -> str:
    # A newline would start a new assignment: one message must never smuggle another.
    return str(value).replace("\r", " ").replace("\n", " ")


class Notifier:
    """Sends sd_notify messages; never raises, so a vanished socket cannot stop the daemon."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int | None = None) -> Notifier:
        """Build from the process environment; `pid` defaults to this process (for WATCHDOG_PID)."""
        raw = environ.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("notify socket unsupported, systemd notifications disabled")
        return cls(address, _watchdog_usec(environ, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (under half of WATCHDOG_USEC), or None without a watchdog."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 1_000_000 * WATCHDOG_FRACTION

    def send(self, **fields: object) -> bool:
        """Send `KEY=value` lines (keys upper-cased) in one datagram; True when it went out."""
        if self.address is None or not fields:
            return False
        message = "\n".join(f"{key.upper()}={_field(value)}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            # Warn once: a missing socket would otherwise log on every watchdog ping.
            if not self._warned:
                self._warned = True
                log.warning("systemd notification failed: %s", exc.strerror or type(exc).__name__)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (Type=notify waits for this)."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def reloading(self, status: str | None = None) -> bool:
        """Tell systemd a reload has begun (`systemctl reload` waits for the READY=1 that ends it).

        MONOTONIC_USEC is what Type=notify-reload requires with RELOADING=1; plain Type=notify
        accepts it too, so one message serves both.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if status is None:
            return self.send(RELOADING=1, MONOTONIC_USEC=usec)
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    def status(self, text: str) -> bool:
        """A one-line human status for `systemctl status`."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """Prove liveness; call only after the daemon made progress."""
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd a clean shutdown has begun."""
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (e.g. while draining)."""
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC when the watchdog is meant for `pid`, else None."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec
