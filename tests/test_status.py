"""``python -m lending status``: what an operator sees of a namespace."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from redis.asyncio import Redis

import lending
from lending.domain.streamids import MAX_ID
from lending.keys import LENDING_GROUP, Keys
from lending.ops.status import Thresholds, breaches, read_group, read_status, render
from lending.redis.consumer import ensure_group

from .conftest import StartWorker
from .support import ROOT, AcksAfterXinfo, decoded, event_for, send, wait_until


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


async def test_a_stream_that_used_up_its_ids_has_no_lag_and_no_error(redis: Redis, keys: Keys, namespace: str) -> None:
    """On Redis 6.2 the lag is counted with XRANGE from the group's last read ID; after
    the greatest ID there is none, and Redis refused the range."""
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    await redis.xadd(keys.lend_requests, {"user_id": "x", "book_ids": "y"}, id=MAX_ID)
    await redis.xreadgroup(LENDING_GROUP, "w1", {keys.lend_requests: ">"}, count=1)

    (group, *_) = (await read_status(redis, namespace))["groups"]

    assert (group["lag"], group["pending"], group["oldest_pending_id"]) == (0, 1, MAX_ID)


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


async def test_a_worker_info_of_another_type_shows_the_worker_without_its_details(
    redis: Redis, keys: Keys, namespace: str
) -> None:
    # A hand edit; the worker's next heartbeat replaces it. status must not fail meanwhile.
    await redis.sadd(keys.workers, "w1")
    await redis.set(keys.worker("w1"), "token", px=60_000)
    await redis.set(keys.worker_info("w1"), "x")

    status = await read_status(redis, namespace)

    assert [w["worker_id"] for w in status["workers"]] == ["w1"]
    assert status["workers"][0]["host"] is None


def status_cli(redis_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lending", "status", "--redis-url", redis_url, "--namespace", namespace, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_check_prints_one_line_per_breach_and_exits_1(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    # Three lends nobody read; a return queued two minutes ago (by its ID) and delivered
    # just now to a consumer that died: its idle time is short, its age is not.
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    for n in range(3):
        await send(redis, keys, "lend", "ada", [f"b{n}"])
    await ensure_group(redis, keys.return_requests, LENDING_GROUP)
    old = f"{int(time.time() * 1000) - 120_000}-0"
    await redis.xadd(keys.return_requests, {"user_id": "bob", "book_ids": "x"}, id=old)
    await redis.xreadgroup(LENDING_GROUP, "ghost", {keys.return_requests: ">"}, count=1)
    await redis.xadd(keys.dead_letters, {"stream": keys.lend_requests, "error": "boom", "deliveries": "10"})

    proc = status_cli(
        redis_url, namespace, "--check", "--max-lag", "2", "--max-pending-age", "60", "--max-dead-letters", "0"
    )

    assert proc.returncode == 1, proc
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4, proc.stdout
    lag, age, letters, workers = lines
    assert all(line.startswith("FAIL ") for line in lines)
    assert "lag" in lag and keys.lend_requests in lag and " 3 " in lag and "--max-lag 2" in lag
    assert keys.return_requests in age and "--max-pending-age 60" in age
    assert 119 <= float(age.split(" s old")[0].rsplit(" ", 1)[1]) < 130, age
    assert "1 dead letter" in letters and "--max-dead-letters 0" in letters
    assert "0 live workers" in workers and "--min-workers 1" in workers

    report = json.loads(status_cli(redis_url, namespace, "--check", "--max-lag", "2", "--json").stdout)
    assert report["ok"] is False
    assert [(b["check"], b["value"], b["limit"]) for b in report["breaches"]] == [
        ("max-lag", 3, 2),
        ("min-workers", 0, 1),
    ]


async def test_check_of_a_healthy_namespace_prints_one_ok_line(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, start_worker: StartWorker
) -> None:
    await start_worker()
    await event_for(redis, keys, "lend", await send(redis, keys, "lend", "ada", ["b1"]))

    proc = status_cli(
        redis_url, namespace, "--check", "--max-lag", "0", "--max-pending-age", "60", "--max-dead-letters", "0"
    )

    assert proc.returncode == 0, proc
    assert proc.stdout.startswith("OK") and len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    assert "1 live worker" in proc.stdout


def test_thresholds_without_check_are_a_usage_error(redis_url: str, namespace: str) -> None:
    proc = status_cli(redis_url, namespace, "--max-lag", "5")
    assert proc.returncode == 2 and "--check" in proc.stderr, proc


def _snapshot(lag: int = 0, age_ms: int | None = None, letters: int = 0, workers: int = 1) -> dict[str, Any]:
    group = {
        "stream": "{ns}:lend-requests",
        "group": LENDING_GROUP,
        "exists": True,
        "lag": lag,
        "pending": 0 if age_ms is None else 1,
        "oldest_pending_id": None if age_ms is None else "1-0",
        "oldest_pending_age_ms": age_ms,
    }
    absent = {**group, "exists": False, "lag": 99, "oldest_pending_age_ms": 10**9}  # not created: never judged
    return {
        "namespace": "ns",
        "groups": [group, absent],
        "dead_letters": letters,
        "workers": [{"worker_id": f"w{n}"} for n in range(workers)],
    }


@pytest.mark.parametrize(
    ("snapshot", "thresholds", "broken"),
    [
        (_snapshot(), Thresholds(0, 0, 0, 1), []),
        (_snapshot(lag=5), Thresholds(max_lag=5), []),
        (_snapshot(lag=6), Thresholds(max_lag=5), [("max-lag", 6, 5)]),
        (_snapshot(age_ms=60_000), Thresholds(max_pending_age_s=60), []),
        (_snapshot(age_ms=60_100), Thresholds(max_pending_age_s=60), [("max-pending-age", 60.1, 60)]),
        (_snapshot(letters=1), Thresholds(max_dead_letters=0), [("max-dead-letters", 1, 0)]),
        (_snapshot(workers=1), Thresholds(min_workers=2), [("min-workers", 1, 2)]),
        (_snapshot(lag=10**6, age_ms=10**9, letters=10**6, workers=0), Thresholds(), []),  # nothing asked
        (
            _snapshot(lag=1, age_ms=2_000, letters=1, workers=0),
            Thresholds(0, 1, 0, 1),
            [("max-lag", 1, 0), ("max-pending-age", 2.0, 1), ("max-dead-letters", 1, 0), ("min-workers", 0, 1)],
        ),
    ],
)
def test_breaches(snapshot: dict[str, Any], thresholds: Thresholds, broken: list[tuple[str, float, float]]) -> None:
    found = breaches(snapshot, thresholds)
    assert [(b.check, b.value, b.limit) for b in found] == broken
    assert all(b.message.startswith("FAIL ") for b in found)


async def test_pending_lists_the_entries_a_consumer_holds(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    await ensure_group(redis, keys.return_requests, LENDING_GROUP)
    old = f"{int(time.time() * 1000) - 90_000}-0"
    lend = decoded(await redis.xadd(keys.lend_requests, {"user_id": "ada", "book_ids": "b1"}, id=old))
    returned = await send(redis, keys, "return", "bob", ["x"])
    # Its own id: the two streams number their entries apart, and may give the same one.
    other = decoded(
        await redis.xadd(keys.lend_requests, {"user_id": "cy", "book_ids": "b2"}, id=f"{int(old.split('-')[0]) + 1}-0")
    )
    await redis.xreadgroup(LENDING_GROUP, "ghost", {keys.lend_requests: ">", keys.return_requests: ">"}, count=1)
    await redis.xclaim(keys.lend_requests, LENDING_GROUP, "ghost", 0, [lend])  # a second delivery
    await redis.xreadgroup(LENDING_GROUP, "other", {keys.lend_requests: ">"}, count=1)

    proc = status_cli(redis_url, namespace, "--pending", "ghost", "--json")

    assert proc.returncode == 0, proc
    report = json.loads(proc.stdout)
    assert report["consumer"] == "ghost"
    entries = {e["id"]: e for e in report["entries"]}
    assert set(entries) == {lend, returned}, "not the other consumer's " + other
    assert (entries[lend]["stream"], entries[lend]["group"], entries[lend]["deliveries"]) == (
        keys.lend_requests,
        LENDING_GROUP,
        2,
    )
    assert entries[returned]["deliveries"] == 1
    assert 90_000 <= entries[lend]["age_ms"] < 120_000 and 0 <= entries[lend]["idle_ms"] < 30_000

    text = status_cli(redis_url, namespace, "--pending", "ghost").stdout
    assert lend in text and returned in text and "deliveries 2" in text and other not in text
    assert "no pending entries" in status_cli(redis_url, namespace, "--pending", "nobody").stdout
