"""The partition proxy: it forwards, and when blackholed neither peer hears anything, not even a close."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support.tcpproxy import TcpProxy

# How long "nothing arrives" is watched for: silence cannot be proven, only observed for a while.
QUIET = 0.5


class Peer:
    """A server on 127.0.0.1 that accepts one connection and hands it to the test."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self._accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.conn, _ = self.listener.accept()
        self._accepted.set()

    def accepted(self) -> socket.socket:
        assert self._accepted.wait(10), "the proxy never connected upstream"
        assert self.conn is not None
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


def _recv_exactly(sock: socket.socket, n: int, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def _hears_nothing(sock: socket.socket) -> bool:
    """True when, for QUIET seconds, no byte, no end (FIN) and no reset (RST) arrives."""
    sock.settimeout(QUIET)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    return False  # data, b"" (FIN) or ConnectionResetError (raised, failing the test)


def test_forwards_both_ways(peer: Peer) -> None:
    with TcpProxy("127.0.0.1", peer.port) as proxy, socket.create_connection((proxy.host, proxy.port)) as client:
        server = peer.accepted()
        client.sendall(b"ping")
        assert _recv_exactly(server, 4) == b"ping"
        server.sendall(b"pong" * 100_000)
        assert _recv_exactly(client, 400_000) == b"pong" * 100_000


def test_blackhole_is_silence_both_ways_and_heal_delivers_what_waited(peer: Peer) -> None:
    with TcpProxy("127.0.0.1", peer.port) as proxy, socket.create_connection((proxy.host, proxy.port)) as client:
        server = peer.accepted()
        proxy.blackhole()
        client.sendall(b"during")
        server.sendall(b"answer")
        assert _hears_nothing(server)
        assert _hears_nothing(client)
        proxy.heal()
        assert _recv_exactly(server, 6) == b"during"
        assert _recv_exactly(client, 6) == b"answer"


def test_a_close_during_the_blackhole_is_not_passed_on(peer: Peer) -> None:
    with TcpProxy("127.0.0.1", peer.port) as proxy:
        client = socket.create_connection((proxy.host, proxy.port))
        server = peer.accepted()
        proxy.blackhole()
        client.close()  # FIN to the proxy, which does not read it
        assert _hears_nothing(server)
        proxy.heal()
        server.settimeout(10)
        assert server.recv(1) == b""  # the end arrives once the network is back


def test_new_connections_during_the_blackhole_hear_nothing_until_healed(peer: Peer) -> None:
    with TcpProxy("127.0.0.1", peer.port) as proxy:
        proxy.blackhole()
        client = socket.create_connection((proxy.host, proxy.port), timeout=5)  # the kernel's backlog answers
        client.sendall(b"hello")
        assert _hears_nothing(client)
        assert proxy.accepted == 0
        proxy.heal()
        assert _recv_exactly(peer.accepted(), 5) == b"hello"
        client.close()


def test_close_ends_the_connections(peer: Peer) -> None:
    proxy = TcpProxy("127.0.0.1", peer.port)
    client = socket.create_connection((proxy.host, proxy.port))
    server = peer.accepted()
    proxy.close()
    server.settimeout(10)
    assert server.recv(1) == b""
    client.close()
    with pytest.raises(OSError):
        socket.create_connection((proxy.host, proxy.port), timeout=2)
