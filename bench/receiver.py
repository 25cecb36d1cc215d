"""A fast webhook receiver for the benchmarks: 204 to every POST, one log line per request.

    python -m bench.receiver PORT LOG [DELAY]

DELAY (seconds, default 0) is slept before answering each request, to stand in for a slow
endpoint; requests are served concurrently, one thread per connection.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 overflows when a client opens 16 connections at once,
    # and Linux then drops the SYNs: the client waits out a 1 s retransmit that no sender caused.
    request_queue_size = 128
    daemon_threads = True


def _lead_id(body: bytes) -> Any:
    """The `data.lead.id` of a Standard Webhooks event body; None for any other shape (apprise's)."""
    with contextlib.suppress(ValueError, AttributeError):
        return (json.loads(body).get("data") or {}).get("lead", {}).get("id")
    return None


def main(port: int, log_path: str, delay: float = 0.0) -> None:
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            arrived = time.monotonic()
            # Logged before the answer, so a sender that has exited has every request in the log.
            with lock:
                log.write(f"{self.headers.get('webhook-id')} {_lead_id(body)} {arrived}\n")
            if delay:
                time.sleep(delay)
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    _Server(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
