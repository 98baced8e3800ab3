"""``python -m lending status``: what an operator sees of a namespace."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

from redis.asyncio import Redis

import lending
from lending.keys import LENDING_GROUP, Keys
from lending.ops.status import read_group, read_status, render
from lending.redis.consumer import ensure_group

from .conftest import StartWorker
from .support import ROOT, AcksAfterXinfo, event_for, send, wait_until


async def test_status_of_a_busy_namespace(redis: Redis, keys: Keys, namespace: str, start_worker: StartWorker) -> None:
    # A consumer that read an entry and died (not long enough ago to be taken over).
    await ensure_group(redis, keys.return_requests, LENDING_GROUP)
    await send(redis, keys, "return", "bob", ["x"])
    await redis.xreadgroup(LENDING_GROUP, "ghost", {keys.return_requests: ">"}, count=1)
    await start_worker(claim_idle_ms=60_000)
    for n in range(3):
        await event_for(redis, keys, "lend", await send(redis, keys, "lend", "ada", [f"b{n}"]))
    await event_for(redis, keys, "lend", await send(redis, keys, "lend", "ada", ["b3", "b4"]))  # ada at 5
    await redis.sadd(keys.storage, "s1")

    status = await read_status(redis, namespace)

    assert status["streams"]["lend-requests"] == 4 and status["streams"]["events"] == 4
    lend_group, return_group, shelving_group = status["groups"]
    assert (lend_group["lag"], lend_group["pending"]) == (0, 0)
    assert return_group["pending"] == 1 and return_group["oldest_pending_idle_ms"] is not None
    assert return_group["dead_consumers"] == [{"consumer": "ghost", "pending": 1}]
    assert shelving_group["exists"]
    assert [w["worker_id"] for w in status["workers"]] == ["w1"]
    assert status["storage"] == {"books": 1, "capacity": 20}
    assert status["books_lent"] == 5 and status["users_at_limit"] == 1 and status["dead_letters"] == 0
    text = render(status)
    assert "dead consumer ghost holds 1 entries" in text and "books lent        5" in text


async def test_lag_counts_unread_entries(redis: Redis, keys: Keys, namespace: str) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    for n in range(3):
        await send(redis, keys, "lend", "ada", [f"b{n}"])
    status = await read_status(redis, namespace)
    assert status["groups"][0]["lag"] == 3
    assert status["workers"] == []


def test_status_command_json(redis_url: str, namespace: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lending", "status", "--redis-url", redis_url, "--namespace", namespace, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["namespace"] == namespace and status["books_lent"] == 0
    assert all(not g["exists"] for g in status["groups"])


def test_status_command_with_redis_unreachable() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lending", "status", "--redis-url", "redis://127.0.0.1:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot reach Redis") and len(proc.stderr.strip().splitlines()) == 1


async def test_entries_acknowledged_while_status_reads_a_group_are_no_error(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    ids = [await send(redis, keys, "lend", "ada", [f"b{n}"]) for n in range(3)]
    await redis.xreadgroup(LENDING_GROUP, "w1", {keys.lend_requests: ">"}, count=10)
    racing = AcksAfterXinfo.racing(redis_url, keys.lend_requests, LENDING_GROUP, ids)
    try:
        group = await read_group(racing, keys.lend_requests, LENDING_GROUP, live=set())
    finally:
        await racing.aclose()
    assert (group["oldest_pending_idle_ms"], group["dead_consumers"]) == (None, [])


async def test_workers_show_host_pid_version_uptime_and_counts(
    redis: Redis, keys: Keys, namespace: str, start_worker: StartWorker
) -> None:
    # Shelving is down: a lend fails twice and is dead-lettered; a return of a book
    # nobody holds needs no shelving and is processed.
    await start_worker(shelving_fail_rate=1.0, max_deliveries=2, worker_ttl_ms=1_000)
    assert (await event_for(redis, keys, "lend", await send(redis, keys, "lend", "ada", ["b1"]))).status == "failed"
    assert (await event_for(redis, keys, "return", await send(redis, keys, "return", "ada", ["x"]))).status == "denied"

    async def counted() -> dict[str, Any] | None:
        status = await read_status(redis, namespace)
        worker: dict[str, Any] = status["workers"][0]
        return worker if (worker.get("processed"), worker.get("failed")) == (1, 2) else None

    await wait_until(counted)
    worker = await counted()
    assert worker is not None
    assert (worker["worker_id"], worker["host"], worker["pid"]) == ("w1", socket.gethostname(), os.getpid())
    assert worker["version"] == lending.__version__
    assert isinstance(worker["uptime_s"], float) and 0 <= worker["uptime_s"] < 60
    text = render(await read_status(redis, namespace))
    assert f"w1  {socket.gethostname()} pid {os.getpid()}, version {lending.__version__}, up " in text
    assert "processed 1, failed 2" in text
