"""Real brokers for the broker-sink tests: the machine's NATS, RabbitMQ and Redis, and servers a test owns.

Each test makes its own stream, exchange and queue, or key, with a random name, and removes it.
Outage tests start a `nats-server` or `redis-server` of their own on a free port, so stopping it
touches nothing else. Under CI=true a broker that does not answer fails the test instead of
skipping it (.ci/run starts the services first).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

NATS_URL = "nats://127.0.0.1:4222"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
# A password the suite's own broker servers require; the log scan looks for it.
BROKER_PASSWORD = "brk-Xq7-never-logged"


def answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def require(port: int, what: str) -> None:
    """Skip when the broker is not running here, except under CI, where that is a failure."""
    if answers(port):
        return
    message = f"{what} does not answer on 127.0.0.1:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (.ci/run should have started it)")
    pytest.skip(message)


def name(prefix: str = "cw") -> str:
    return f"{prefix}{secrets.token_hex(5)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, up: bool, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while answers(port) != up:
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} still {'down' if up else 'up'} after {timeout}s")
        time.sleep(0.02)


def binary(program: str, *fallbacks: str) -> str:
    found = shutil.which(program) or next((f for f in fallbacks if os.path.exists(f)), None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{program} is not installed")
        pytest.skip(f"{program} is not installed")
    return found


class OwnServer:
    """A broker server process this test owns, on a free port; stop() and start() cut it mid-stream."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.argv = argv
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OwnServer:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, True)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        wait_port(self.port, False)

    def __enter__(self) -> OwnServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def own_nats(store: Path, *, password: str | None = None) -> OwnServer:
    port = free_port()
    argv = [binary("nats-server", "/usr/sbin/nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js"]
    argv += ["-sd", str(store)]
    if password:
        argv += ["--user", "watcher", "--pass", password]
    return OwnServer(argv, port)


def own_redis(*, password: str | None = None, persist: Path | None = None) -> OwnServer:
    """A redis-server of the test's own; with `persist`, an append-only file there keeps every
    acknowledged write across a restart (fsync on each), as a production Redis holding a stream would."""
    port = free_port()
    argv = [binary("redis-server", "/usr/bin/redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    if persist is None:
        argv += ["--appendonly", "no", "--dir", tempfile.gettempdir()]
    else:
        persist.mkdir(parents=True, exist_ok=True)
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(persist)]
    if password:
        argv += ["--requirepass", password]
    return OwnServer(argv, port)


# --- destinations made for one test and removed after it ------------------------------------


@dataclass
class JetStream:
    url: str
    stream: str
    prefix: str  # the stream stores "<prefix>.>"

    def messages(self) -> list[Any]:
        """Every message in the stream, in stream order (nats-py RawStreamMsg: .data, .headers)."""
        return asyncio.run(_nats_messages(self.url, self.stream))

    def count(self) -> int:
        return int(asyncio.run(_nats_count(self.url, self.stream)))


async def _nats_connect(url: str, ca: Path | None = None) -> Any:
    import nats

    tls = ssl.create_default_context(cafile=str(ca)) if ca else None
    return await nats.connect(url, allow_reconnect=False, tls=tls)


async def _nats_count(url: str, stream: str) -> int:
    nc = await _nats_connect(url)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def _nats_messages(url: str, stream: str) -> list[Any]:
    nc = await _nats_connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with suppress(Exception):  # a deleted sequence
                out.append(await js.get_msg(stream, seq))
        return out
    finally:
        await nc.close()


async def _nats_stream(url: str, stream: str, prefix: str, delete: bool, ca: Path | None = None) -> None:
    nc = await _nats_connect(url, ca)
    try:
        js = nc.jetstream()
        if delete:
            with suppress(Exception):
                await js.delete_stream(stream)
        else:
            await js.add_stream(name=stream, subjects=[f"{prefix}.>"])
    finally:
        await nc.close()


@contextmanager
def jetstream(url: str = NATS_URL, ca: Path | None = None) -> Iterator[JetStream]:
    """A stream storing "<prefix>.>" (`ca`: the CA of a TLS server; messages() does not read over TLS)."""
    stream = name("CW")
    made = JetStream(url, stream, stream.lower())
    asyncio.run(_nats_stream(url, stream, made.prefix, delete=False, ca=ca))
    try:
        yield made
    finally:
        asyncio.run(_nats_stream(url, stream, made.prefix, delete=True, ca=ca))


@dataclass
class Rabbit:
    url: str
    exchange: str
    queue: str

    def messages(self) -> list[Any]:
        """Every message waiting in the test's queue (aio-pika IncomingMessage, acknowledged)."""
        return asyncio.run(_amqp_drain(self.url, self.queue))


async def _amqp_drain(url: str, queue: str) -> list[Any]:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=True)
        out = []
        while (message := await q.get(fail=False, no_ack=True)) is not None:
            out.append(message)
        return out
    finally:
        await connection.close()


async def _amqp_setup(url: str, exchange: str, queue: str, bind: str | None, delete: bool) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        if delete:
            with suppress(Exception):
                await channel.queue_delete(queue)
            with suppress(Exception):
                await channel.exchange_delete(exchange)
            return
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await channel.declare_queue(queue, durable=True)
        if bind is not None:
            await q.bind(ex, bind)
    finally:
        await connection.close()


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def rabbit_connections(vhost: str) -> int:
    """How many client connections the vhost has now."""
    return len([line for line in rabbitmqctl("list_connections", "-p", vhost, "pid").splitlines() if "<" in line])


@contextmanager
def rabbit_vhost() -> Iterator[str]:
    """A vhost of the test's own (guest may use it): its connections can be closed without touching others'."""
    vhost = name("cw-vh-")
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


@contextmanager
def rabbit(bind: str | None = "#", url: str = AMQP_URL) -> Iterator[Rabbit]:
    """A durable topic exchange and a durable queue bound to it with `bind` (None: not bound)."""
    made = Rabbit(url, name("cw-ex-"), name("cw-q-"))
    asyncio.run(_amqp_setup(url, made.exchange, made.queue, bind, delete=False))
    try:
        yield made
    finally:
        asyncio.run(_amqp_setup(url, made.exchange, made.queue, None, delete=True))


@dataclass
class RedisStream:
    url: str
    key: str

    def entries(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return asyncio.run(_redis(self.url, "xrange", self.key))


async def _redis(url: str, command: str, *args: Any) -> Any:
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(url)
    try:
        return await getattr(client, command)(*args)
    finally:
        await client.aclose()


@contextmanager
def redis_stream(url: str = REDIS_URL) -> Iterator[RedisStream]:
    made = RedisStream(url, name("cw:"))
    try:
        yield made
    finally:
        asyncio.run(_redis(url, "delete", made.key))


def headers_of(message: Any) -> dict[str, str]:
    """The Standard Webhooks headers of a consumed message, whichever broker it came from."""
    if isinstance(message, tuple):  # a Redis entry: (id, fields)
        fields = {k.decode(): v.decode() for k, v in message[1].items() if k != b"body"}
        return fields
    raw = message.headers or {}
    return {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in raw.items()}


def body_of(message: Any) -> bytes:
    if isinstance(message, tuple):
        return bytes(message[1][b"body"])
    return bytes(message.data if hasattr(message, "data") else message.body)
