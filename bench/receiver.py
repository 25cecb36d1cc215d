"""A fast webhook receiver for the benchmarks: 204 to every POST, one log line per request."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def main(port: int, log_path: str) -> None:
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            arrived = time.monotonic()
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
            lead: Any = None
            with contextlib.suppress(ValueError):
                lead = (json.loads(body).get("data") or {}).get("lead", {}).get("id")
            with lock:
                log.write(f"{self.headers.get('webhook-id')} {lead} {arrived}\n")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
