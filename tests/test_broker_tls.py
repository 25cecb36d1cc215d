"""Broker sinks over TLS: verified against what webhooks trust (SSL_CERT_FILE here), refused otherwise.

A nats-server and a redis-server of the test's own serve TLS with a throwaway CA (trustme); the
real CLI (`send-test`, in a subprocess, so the process's trust is read from its environment)
publishes through them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trustme

from tests.conftest import serving
from tests.support import brokers
from tests.support.daemon import WEBHOOK_KEY, write_config


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.cert_chain_pems[0].write_to_path(str(paths[1]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    return paths


def _send_test(tmp_path: Path, sink: dict[str, object], trust: Path | None) -> tuple[int, str]:
    with serving() as (_simulator, server):
        config = write_config(tmp_path, server.url, [sink])
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    if trust is not None:
        env["SSL_CERT_FILE"] = str(trust)
    argv = [sys.executable, "-m", "watcher", "send-test", "-c", str(config), "--sink", str(sink["name"])]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    return result.returncode, result.stdout + result.stderr


def test_nats_over_tls_verifies_the_server(tmp_path: Path) -> None:
    ca, cert, key = _files(tmp_path)
    server = brokers.own_nats(tmp_path / "js")
    server.argv += ["--tls", "--tlscert", str(cert), "--tlskey", str(key)]
    with server:
        url = f"tls://127.0.0.1:{server.port}"
        with brokers.jetstream(url, ca=ca) as js:
            sink = {"name": "bus", "type": "nats", "url": url, "subject": js.prefix + ".{type}", "secret": WEBHOOK_KEY}
            code, said = _send_test(tmp_path, sink, ca)
            assert code == 0, said
            assert "bus: accepted: confirmed by the broker" in said
            assert "eof_received" not in said  # asyncio's noise about the TLS upgrade is filtered out
            code, said = _send_test(tmp_path, sink, None)
    assert code == 1
    assert "bus: not accepted" in said and "certificate verify failed" in said.lower()


def test_redis_over_tls_verifies_the_server(tmp_path: Path) -> None:
    ca, cert, key = _files(tmp_path)
    server = brokers.own_redis()
    tls_port = server.port
    server.argv = [
        *(a if a != str(tls_port) else "0" for a in server.argv),
        *("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"),
    ]
    with server:
        key_name = brokers.name("cw:")
        url = f"rediss://127.0.0.1:{tls_port}/0"
        sink = {"name": "stream", "type": "redis", "url": url, "stream": key_name}
        code, said = _send_test(tmp_path, sink, ca)
        assert code == 0, said
        code, said = _send_test(tmp_path, sink, None)
    assert code == 1
    assert "stream: not accepted" in said and "certificate verify failed" in said.lower()
