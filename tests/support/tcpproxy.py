"""A TCP proxy for partition tests: 127.0.0.1:<free port> → target, that can go silent.

`blackhole()` stops forwarding in both directions without closing any socket: no FIN, no RST,
nothing. Each peer sees the other go quiet, as across a network partition; what either sends
waits in the kernel buffers (as TCP would retransmit it), and a close is not passed on either.
New connections are not accepted meanwhile (they wait in the listen backlog, so a connect seems
to succeed and then nothing answers). `heal()` forwards again, what waited included; `close()`
ends everything.

`lose_answers_after(pattern)` cuts one direction of one connection: the first connection whose
client sends `pattern` (say b"COMMIT") no longer gets anything back from the server, while what
it sends still arrives, as when a partition falls between a request and its answer.

`blackhole_after(pattern)` goes silent at a chosen point: the chunk in which a client sends
`pattern` is passed on to the server, then nothing more, either way (`PIPELINE_FLUSH`: a
pipelined client asking for the answers so far, after which the server waits for the rest of the
pipeline).

One thread with a selector, so the proxy keeps working while the test's own event loop or
threads are blocked.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

_CHUNK = 65536
_BUFFER_CAP = 1 << 20  # stop reading a side while this much waits for the other
# The frontend's Flush message ('H', length 4): libpq sends it in pipeline mode to have the
# answers so far without ending the pipeline (psycopg, fetching a result inside a pipeline).
PIPELINE_FLUSH = b"H\x00\x00\x00\x04"


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    upstream: socket.socket
    # Bytes read from one side waiting to be written to the other, and whether that side said EOF.
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    client_eof: bool = False
    upstream_eof: bool = False
    shut_upstream: bool = False
    shut_client: bool = False
    mute_to_client: bool = False  # the server's bytes are held back (one-way partition)

    def done(self) -> bool:
        return self.shut_upstream and self.shut_client


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._silent = False
        self._closed = False
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.accepted = 0
        self._trigger: bytes | None = None
        self._silence_trigger: bytes | None = None
        self.silenced_at: float | None = None  # time.monotonic() when blackhole_after's pattern passed
        self._thread = threading.Thread(target=self._loop, name=f"tcpproxy:{self.port}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- control

    def blackhole(self) -> None:
        """Stop forwarding both ways; every socket stays open."""
        self._set(silent=True)

    def heal(self) -> None:
        """Forward again, starting with whatever waited (one-way cuts included)."""
        with self._lock:
            self._trigger = None
            self._silence_trigger = None
            for pair in self._pairs:
                pair.mute_to_client = False
        self._set(silent=False)

    def lose_answers_after(self, pattern: bytes) -> None:
        """Once a client sends `pattern`, hold back everything the server sends on that connection."""
        with self._lock:
            self._trigger = pattern
        self._wake()

    def blackhole_after(self, pattern: bytes) -> None:
        """Once a client sends `pattern`, pass that chunk on to the server, then go silent as blackhole()."""
        with self._lock:
            self._silence_trigger = pattern
            self.silenced_at = None
        self._wake()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        self._thread.join(timeout=10)
        for pair in self._pairs:
            pair.client.close()
            pair.upstream.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def silent(self) -> bool:
        return self._silent

    def _set(self, *, silent: bool) -> None:
        with self._lock:
            self._silent = silent
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------- loop

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            while not self._closed:
                self._register(selector)
                for key, events in selector.select(timeout=1.0):
                    self._ready(key.fileobj, events)  # type: ignore[arg-type]
                self._pairs = [p for p in self._pairs if not self._finish(p)]
        finally:
            selector.close()

    def _register(self, selector: selectors.BaseSelector) -> None:
        for key in list(selector.get_map().values()):
            selector.unregister(key.fileobj)
        selector.register(self._wake_r, selectors.EVENT_READ)
        if self._silent:
            return  # nothing read, written or accepted: every peer hears silence
        selector.register(self._listener, selectors.EVENT_READ)
        for pair in self._pairs:
            for sock, inbound, outbound, eof, shut in (
                (pair.client, pair.to_upstream, pair.to_client, pair.client_eof, pair.shut_client),
                (pair.upstream, pair.to_client, pair.to_upstream, pair.upstream_eof, pair.shut_upstream),
            ):
                events = 0
                if not eof and len(inbound) < _BUFFER_CAP:
                    events |= selectors.EVENT_READ
                if outbound and not shut and not (sock is pair.client and pair.mute_to_client):
                    events |= selectors.EVENT_WRITE
                if events:
                    selector.register(sock, events, pair)

    def _ready(self, sock: socket.socket, events: int) -> None:
        if sock is self._wake_r:
            try:
                while self._wake_r.recv(1024):
                    pass
            except BlockingIOError:
                pass
            return
        if self._silent:
            return  # blackhole() came while select() was waiting: what it found ready waits too
        if sock is self._listener:
            self._accept()
            return
        pair = next((p for p in self._pairs if sock in (p.client, p.upstream)), None)
        if pair is None:
            return
        from_client = sock is pair.client
        if events & selectors.EVENT_READ:
            try:
                data = sock.recv(_CHUNK)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""  # a reset: pass it on as an end
            if data == b"":
                if from_client:
                    pair.client_eof = True
                else:
                    pair.upstream_eof = True
            elif data:
                with self._lock:
                    if from_client and self._trigger is not None and self._trigger in data:
                        pair.mute_to_client = True
                        self._trigger = None
                (pair.to_upstream if from_client else pair.to_client).extend(data)
                if from_client and self._silence_trigger is not None and self._silence_trigger in data:
                    self._silence_after(pair)
                    return
        if events & selectors.EVENT_WRITE:
            buffer = pair.to_client if from_client else pair.to_upstream
            try:
                sent = sock.send(buffer)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = len(buffer)  # the peer is gone: drop what it will never read
                if from_client:
                    pair.client_eof = True
                else:
                    pair.upstream_eof = True
            del buffer[:sent]

    def _silence_after(self, pair: _Pair) -> None:
        """Send what this client just sent (the pattern with it) to the server, then silence everything."""
        with contextlib.suppress(OSError):
            sent = pair.upstream.send(pair.to_upstream)
            del pair.to_upstream[:sent]
        with self._lock:
            self._silence_trigger = None
            self._silent = True
            self.silenced_at = time.monotonic()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        client.setblocking(False)
        upstream.setblocking(False)
        self._pairs.append(_Pair(client, upstream))
        self.accepted += 1

    def _finish(self, pair: _Pair) -> bool:
        """Pass an end on once what preceded it is written; True when the pair is over."""
        if self._silent:
            return False
        if pair.client_eof and not pair.to_upstream and not pair.shut_upstream:
            _shutdown(pair.upstream)
            pair.shut_upstream = True
        if pair.upstream_eof and not pair.to_client and not pair.shut_client and not pair.mute_to_client:
            _shutdown(pair.client)
            pair.shut_client = True
        if pair.done():
            pair.client.close()
            pair.upstream.close()
            return True
        return False


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
