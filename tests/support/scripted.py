"""A TCP server on 127.0.0.1 that follows a script per connection: for what a well-behaved
receiver never does (stray bytes, cut-off answers, closes at the worst moment)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


def read_request(conn: socket.socket) -> bytes:
    """One request's head and Content-Length body off `conn`; b"" when the client closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = conn.recv(65536)
        except ConnectionError:  # the client dropped the connection (an abort resets it)
            return b""
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head


NO_CONTENT = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
Script = Callable[[socket.socket, list[bytes]], None]


class Scripted:
    """A TCP server on 127.0.0.1 that hands its n-th connection to the n-th script and records
    every request head it reads (in `heads`, with the connection's number in `conns`)."""

    def __init__(self, *scripts: Script) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.heads: list[bytes] = []
        self.conns: list[int] = []
        self._scripts = scripts
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        for number, script in enumerate(self._scripts):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by the test before every script had its connection
            with conn:
                script(conn, _Heads(self, number))

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


class _Heads(list[bytes]):
    """A script's record of the heads it read, written through to its server at once: scripts
    record a head before answering it, so a client that has its answer finds the head recorded."""

    def __init__(self, server: Scripted, number: int) -> None:
        super().__init__()
        self._server = server
        self._number = number

    def append(self, head: bytes) -> None:
        super().append(head)
        self._server.heads.append(head)
        self._server.conns.append(self._number)


def answer(*replies: bytes, read_more: bool = False) -> Script:
    """A connection that answers its requests with `replies` in turn; with `read_more`, it reads
    one more request and closes without answering it (the race of a server closing an idle
    connection just as a request goes out)."""

    def script(conn: socket.socket, heads: list[bytes]) -> None:
        for reply in replies:
            head = read_request(conn)
            if not head:
                return
            heads.append(head)
            conn.sendall(reply)
        if read_more and (head := read_request(conn)):
            heads.append(head)

    return script
