"""Helpers shared by the tests: sending requests, reading events, running processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from lending.client import wait_for_event
from lending.domain.events import Event
from lending.keys import Keys
from lending.service.lending import LendingService
from lending.redis.consumer import Delivery

ROOT = Path(__file__).resolve().parent.parent


async def send(client: Redis, keys: Keys, action: str, user: str, books: Sequence[str]) -> str:
    """Queue a well-formed request; returns its entry id."""
    entry = await client.xadd(keys.requests(action), {"user_id": user, "book_ids": ",".join(books)})
    return str(entry.decode())


async def send_raw(client: Redis, keys: Keys, action: str, fields: Mapping[bytes | str, bytes | str]) -> str:
    entry = await client.xadd(keys.requests(action), dict(fields))  # type: ignore[arg-type]
    return str(entry.decode())


async def event_for(client: Redis, keys: Keys, action: str, request_id: str, timeout_s: float = 10.0) -> Event:
    event = await wait_for_event(client, keys, action, request_id, "0-0", timeout_s)
    assert event is not None, f"no event for {action} {request_id} within {timeout_s} s"
    return event


async def all_events(client: Redis, keys: Keys) -> list[Event]:
    return [Event.from_fields(fields, eid.decode()) for eid, fields in await client.xrange(keys.events)]


async def wait_until(predicate: object, timeout_s: float = 10.0, interval_s: float = 0.05) -> None:
    """Await ``predicate()`` (sync or async) until truthy, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


def process_env(redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENDING_")}
    env.update(REDIS_URL=redis_url, LENDING_NAMESPACE=namespace, PYTHONUNBUFFERED="1", **extra)
    return env


def start_worker_process(
    worker_id: str, redis_url: str, namespace: str, *args: str, **env: str
) -> subprocess.Popen[str]:
    """``python main.py WORKER_ID`` as a child process; waits until it is ready."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), worker_id, *args],
        cwd=ROOT,
        env=process_env(redis_url, namespace, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "Ready to process events" not in line:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(f"worker did not start: {line!r} {err[-2000:]}")
    return proc


def run_get_books(redis_url: str, namespace: str, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "get_books.py"), *args],
        cwd=ROOT,
        env=process_env(redis_url, namespace),
        capture_output=True,
        text=True,
        timeout=timeout_s,
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

    async def xinfo_groups(self, name: Any) -> Any:
        groups = await super().xinfo_groups(name)
        stream, group, ids = self.acks
        if ids:
            await self.xack(stream, group, *ids)
        return groups
