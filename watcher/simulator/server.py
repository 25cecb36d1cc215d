"""Serving the simulator over HTTP/1.1 keep-alive with the standard library."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

from watcher.simulator.admin import handle_admin, is_loopback_host
from watcher.simulator.api import Request, Response, api_error, handle, json_response
from watcher.simulator.model import Simulator
from watcher.simulator.phptime import http_date

_FAULT_POLL = 0.02


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def drop_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nginx"
    sys_version = ""
    timeout = 120
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests and the demo read `Simulator.requests` instead."""

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _wait_out_faults(self, sim: Simulator) -> bool:
        """Honour `hang` and `latency`; False when the server is stopping meanwhile."""
        stopping = self.server.stopping
        while sim.faults.hang:
            if stopping.wait(_FAULT_POLL):
                return False
        latency = sim.faults.latency
        return not (latency > 0 and stopping.wait(latency))

    def _dispatch(self) -> None:
        sim = self.server.sim
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        path, _, query = self.path.partition("?")
        request = Request(
            method=self.command,
            path=path,
            query=query.partition("#")[0],
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            client=self.client_address[0],
        )
        try:
            if not is_loopback_host(request.header("host")):
                # DNS rebinding: a web page whose name resolves to 127.0.0.1 reaches this socket
                # with its own name in Host. Only requests that name loopback are for us.
                response = json_response(
                    421, {"error": "the simulator answers loopback host names only"}, "application/json"
                )
            elif path.startswith("/_sim/"):
                response = handle_admin(sim, request)
            elif not self._wait_out_faults(sim):
                self.close_connection = True
                return
            else:
                response = handle(sim, request)
        except Exception:
            traceback.print_exc()
            response = api_error(500, "Internal Server Error", "jsonld")
        self._send(response, sim)

    def _send(self, response: Response, sim: Simulator) -> None:
        # One write per response: split header/body writes stall on Nagle plus delayed ACK.
        phrase = self.responses.get(response.status, ("",))[0]
        lines = [
            f"{self.protocol_version} {response.status} {phrase}",
            f"Server: {self.server_version}",
            f"Date: {http_date(sim.now_ts())}",
            *(f"{name}: {value}" for name, value in response.headers.items()),
            f"Content-Length: {len(response.body)}",
        ]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + response.body)
        self.wfile.flush()


class SimulatorServer:
    """The simulator on a loopback socket, served from a background thread."""

    def __init__(self, sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sim = sim
        self.host = host
        self.requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the simulator server is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> SimulatorServer:
        if self._server is None:
            self._server = _Server((self.host, self.requested_port), self.sim)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="convertr-sim", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_simulator(
    port: int,
    seed: int,
    username: str,
    password: str,
    *,
    campaigns: int,
    leads: int,
    rate_limit: bool = True,
    timezone: str = "Europe/London",
) -> None:
    """Serve a seeded simulator on 127.0.0.1 until SIGINT or SIGTERM (the CLI's `simulate`)."""
    sim = Simulator(seed=seed, username=username, password=password, timezone=timezone, rate_limit=rate_limit)
    sim.seed_data(campaigns=campaigns, leads=leads)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if in_main else None
    try:
        # The CLI prints the banner; staying silent here keeps it from being said twice.
        with SimulatorServer(sim, port=port), contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
