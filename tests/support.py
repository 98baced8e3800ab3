"""Helpers shared by the tests: reading replies, sending requests, reading events, running
processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT, KeyT

from lending.client import wait_for_event
from lending.domain.events import Event
from lending.keys import Keys
from lending.redis.connection import make_client
from lending.redis.consumer import Delivery
from lending.service.lending import LendingService
from lending.settings import Settings
from lending.worker import Worker

ROOT = Path(__file__).resolve().parent.parent

# -- reading replies -----------------------------------------------------------------------
# The test clients are bytes in, bytes out (``make_client``: decode_responses=False, RESP2),
# so every key, field, value and entry ID of a reply is bytes, where redis-py's types say
# ``bytes | str`` (or ``| None``, or ``Any``). These helpers check that once, at run time,
# and hand the tests plain types.

#: A stream entry as the client receives it: (entry ID, {field: value}).
RawEntry = tuple[str, dict[bytes, bytes]]


def as_bytes(value: object) -> bytes:
    """A key, field or value of a reply, which the test clients receive as bytes."""
    assert isinstance(value, bytes), f"not a bytes reply: {value!r}"
    return value


def decoded(value: object) -> str:
    """A key, field, value or ID of a reply as text (a ``str`` passes as it is)."""
    if isinstance(value, str):
        return value
    return as_bytes(value).decode()


def raw_entries(reply: object) -> list[RawEntry]:
    """The entries of an XRANGE, XREVRANGE or XCLAIM reply, their fields as bytes."""
    assert isinstance(reply, list), f"not a list of entries: {reply!r}"
    out: list[RawEntry] = []
    for entry in reply:
        assert isinstance(entry, (tuple, list)) and len(entry) == 2, f"not an entry: {entry!r}"
        entry_id, fields = entry
        assert isinstance(fields, dict), f"an entry without fields (deleted?): {entry!r}"
        out.append((decoded(entry_id), {as_bytes(k): as_bytes(v) for k, v in fields.items()}))
    return out


def raw_streams(reply: object) -> list[tuple[str, list[RawEntry]]]:
    """An XREAD or XREADGROUP reply: (stream, its entries) for each stream with new
    entries; ``[]`` when there were none."""
    if reply is None:
        return []
    assert isinstance(reply, list), f"not an XREAD reply: {reply!r}"
    out: list[tuple[str, list[RawEntry]]] = []
    for item in reply:
        assert isinstance(item, (tuple, list)) and len(item) == 2, f"not a stream of entries: {item!r}"
        stream, entries = item
        out.append((decoded(stream), raw_entries(entries)))
    return out


async def stream_entries(
    client: Redis, key: KeyT, start: str = "-", end: str = "+", count: int | None = None
) -> list[tuple[str, dict[str, str]]]:
    """XRANGE decoded: [(entry ID, {field: value})], fields in their stream order."""
    return [
        (entry_id, {k.decode(): v.decode() for k, v in fields.items()})
        for entry_id, fields in raw_entries(await client.xrange(key, min=start, max=end, count=count))
    ]


async def hash_of(client: Redis, key: KeyT) -> dict[str, str]:
    """HGETALL decoded."""
    return {decoded(k): decoded(v) for k, v in (await client.hgetall(key)).items()}


async def members(client: Redis, key: KeyT) -> set[str]:
    """SMEMBERS decoded."""
    return {decoded(m) for m in await client.smembers(key)}


F = TypeVar("F", bound=bytes | str)
E = TypeVar("E", bound=EncodableT)


def xadd_fields(fields: Mapping[F, E]) -> dict[FieldT, EncodableT]:
    """``fields`` as XADD's parameter. XADD only reads it, so any mapping would do, but
    redis-py asks for a ``dict[FieldT, EncodableT]``, and a dict is invariant: neither a
    ``dict[str, str]`` nor a ``Mapping`` matches it."""
    return dict(fields.items())


async def run_command(client: Redis, *args: EncodableT) -> object:
    """A command redis-py has no fitting typed method for (``ACL SETUSER`` with the raw
    rules under test): its reply."""
    # redis-py leaves the asyncio Redis.execute_command unannotated.
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


# -- sending requests, waiting for events --------------------------------------------------


async def send(client: Redis, keys: Keys, action: str, user: str, books: Sequence[str]) -> str:
    """Queue a well-formed request; returns its entry id."""
    return decoded(await client.xadd(keys.requests(action), {"user_id": user, "book_ids": ",".join(books)}))


async def send_raw(client: Redis, keys: Keys, action: str, fields: Mapping[bytes | str, bytes | str]) -> str:
    return decoded(await client.xadd(keys.requests(action), xadd_fields(fields)))


async def event_for(client: Redis, keys: Keys, action: str, request_id: str, timeout_s: float = 10.0) -> Event:
    event = await wait_for_event(client, keys, action, request_id, "0-0", timeout_s)
    assert event is not None, f"no event for {action} {request_id} within {timeout_s} s"
    return event


async def all_events(client: Redis, keys: Keys) -> list[Event]:
    """``{NS}:events`` as events (equal when their fields are, whatever their IDs)."""
    return [Event.from_fields(fields, event_id) for event_id, fields in raw_entries(await client.xrange(keys.events))]


async def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.05) -> None:
    """Await ``predicate()`` (sync or async) until truthy, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """``GET path`` (HTTP/1.0) from ``host:port``: the status code and the body."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    await writer.wait_closed()
    return int(response.split()[1]), response.partition("\r\n\r\n")[2]


def process_env(redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENDING_")}
    env.update(REDIS_URL=redis_url, LENDING_NAMESPACE=namespace, PYTHONUNBUFFERED="1", **extra)
    return env


def start_ready_process(
    command: list[str], redis_url: str, namespace: str, ready: str, **env: str
) -> tuple[subprocess.Popen[str], str]:
    """``command`` as a child process of the repository, once its first line of output
    says ``ready``: the process, and that line."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=process_env(redis_url, namespace, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if ready not in line:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(f"{' '.join(command[1:3])} did not start: {line!r} {err[-2000:]}")
    return proc, line


def start_worker_process(
    worker_id: str, redis_url: str, namespace: str, *args: str, **env: str
) -> subprocess.Popen[str]:
    """``python main.py WORKER_ID`` as a child process; waits until it is ready."""
    command = [sys.executable, str(ROOT / "main.py"), worker_id, *args]
    return start_ready_process(command, redis_url, namespace, "Ready to process events", **env)[0]


def run_python(
    redis_url: str, namespace: str, *args: str, timeout_s: float = 30.0, **env: str
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` (a script or ``-m module``) in the repository, to its end, with
    ``REDIS_URL``, ``LENDING_NAMESPACE`` and ``env`` set; its output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=process_env(redis_url, namespace, **env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def run_get_books(
    redis_url: str, namespace: str, *args: str, timeout_s: float = 30.0, **env: str
) -> subprocess.CompletedProcess[str]:
    return run_python(redis_url, namespace, str(ROOT / "get_books.py"), *args, timeout_s=timeout_s, **env)


def run_into_a_full_disk(redis_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``run_python`` with stdout on /dev/full, where every write fails (no space left)."""
    with open("/dev/full", "w") as full:
        return subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env=process_env(redis_url, namespace),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )


def stop_process(proc: subprocess.Popen[str], timeout_s: float = 15.0) -> tuple[int, str, str]:
    """SIGTERM, wait, and return (exit code, stdout, stderr); SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


async def process_one(service: LendingService, delivery: Delivery) -> Event | None:
    """Process one entry as a batch of one; ``None``: finished by another consumer."""
    (event,) = await service.process_batch([delivery])
    return event


class AcksAfterXinfo(Redis):
    """A real client; right after its XINFO GROUPS reply another worker acknowledges the
    group's pending entries, before XPENDING is asked (the race, made deterministic)."""

    acks: tuple[str, str, list[str]] = ("", "", [])

    @classmethod
    def racing(cls, url: str, stream: str, group: str, ids: list[str]) -> AcksAfterXinfo:
        """A client of ``url`` that acknowledges ``ids`` of ``stream`` for ``group``."""
        client = cls.from_url(url)
        assert isinstance(client, cls)  # from_url builds a cls; redis-py annotates it as Redis
        client.acks = (stream, group, ids)
        return client

    async def xinfo_groups(self, name: KeyT) -> list[dict[str, Any]]:
        groups = await super().xinfo_groups(name)
        stream, group, ids = self.acks
        if ids:
            await self.xack(stream, group, *ids)
        return groups


@contextlib.asynccontextmanager
async def in_process_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker of ``settings`` (its own client of ``settings.redis_url``), stopped on leaving."""
    assert settings.redis_url is not None
    client = make_client(settings.redis_url)
    worker = Worker(settings, client, handle_signals=False)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        await client.aclose()
