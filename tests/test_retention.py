"""Streams stay bounded, and trimming never loses work."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from lending.domain.streamids import MAX_ID, canonical_id, next_id
from lending.keys import LENDING_GROUP, Keys
from lending.ops import checker
from lending.ops.retention import first_needed, safe_trim_id, trim
from lending.redis.consumer import ensure_group
from lending.settings import Limits

from .conftest import StartWorker
from .support import AcksAfterXinfo, decoded, event_for, raw_entries, send, wait_until


def test_next_id() -> None:
    assert next_id("5-0") == "5-1"
    assert next_id("0-0") == "0-1"
    assert next_id("5-18446744073709551615") == "6-0"
    assert next_id(MAX_ID) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("7-0", "7-0"), ("007-00", "7-0"), ("0-0", "0-0"), ("1-18446744073709551615", "1-18446744073709551615")],
)
def test_canonical_id_is_the_id_as_redis_writes_it(value: str, expected: str) -> None:
    assert canonical_id(value) == expected


@pytest.mark.parametrize("value", ["7", "7-", "-1", "a-1", "1-18446744073709551616", "\uff11-1", " 1-1"])
def test_canonical_id_of_what_is_not_a_whole_id_is_none(value: str) -> None:
    assert canonical_id(value) is None


@pytest.mark.parametrize(
    ("group", "summary", "needed"),
    [
        ({"pending": 0, "last-delivered-id": b"7-0"}, None, "7-1"),
        ({"pending": 2, "last-delivered-id": b"7-0"}, {"pending": 2, "min": b"3-0", "max": b"7-0"}, "3-0"),
        # XINFO counted pending entries, then they were acknowledged before XPENDING.
        ({"pending": 2, "last-delivered-id": b"7-0"}, {"pending": 0, "min": None, "max": None}, "7-1"),
    ],
    ids=["nothing pending", "oldest pending entry", "acknowledged between the two reads"],
)
def test_the_first_entry_a_group_still_needs(
    group: dict[str, Any], summary: dict[str, Any] | None, needed: str
) -> None:
    assert first_needed(group, summary) == needed


async def test_entries_acknowledged_between_xinfo_and_xpending_are_no_error(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    ids = [await send(redis, keys, "lend", "ada", [f"b{n}"]) for n in range(3)]
    await redis.xreadgroup(LENDING_GROUP, "w1", {keys.lend_requests: ">"}, count=10)
    racing = AcksAfterXinfo.racing(redis_url, keys.lend_requests, LENDING_GROUP, ids)
    try:
        assert await safe_trim_id(racing, keys.lend_requests) == next_id(ids[-1])
    finally:
        await racing.aclose()


async def test_a_long_run_stays_bounded_and_the_checker_still_passes(
    redis: Redis, keys: Keys, namespace: str, start_worker: StartWorker
) -> None:
    await start_worker(events_maxlen=100, trim_interval_s=0.2)
    for n in range(600):
        await send(redis, keys, "lend" if n % 2 == 0 else "return", f"user-{n % 50}", [f"book-{n % 300}"])
    await wait_until(lambda: _all_answered(redis, keys), timeout_s=30)
    await wait_until(lambda: _trimmed(redis, keys), timeout_s=10)

    assert await redis.xlen(keys.events) < 300  # about 100: Redis trims whole nodes
    assert await redis.exists(keys.events_trimmed_to)
    report = await checker.check(
        redis, namespace, wait_quiescent_s=10, limits=Limits(max_books_per_user=5, storage_capacity=20)
    )
    assert report.quiescent and report.clean, report.violations


async def _all_answered(redis: Redis, keys: Keys) -> bool:
    groups = await redis.xinfo_groups(keys.lend_requests) + await redis.xinfo_groups(keys.return_requests)
    pending = sum(int(g["pending"]) for g in groups)
    return pending == 0 and await redis.xlen(keys.events) > 0 and await _caught_up(redis, keys)


async def _caught_up(redis: Redis, keys: Keys) -> bool:
    for stream in (keys.lend_requests, keys.return_requests):
        last = await redis.xrevrange(stream, count=1)
        groups = await redis.xinfo_groups(stream)
        if last and groups[0]["last-delivered-id"] != last[0][0]:
            return False
    return True


async def _trimmed(redis: Redis, keys: Keys) -> bool:
    return await redis.xlen(keys.lend_requests) == 0 and await redis.xlen(keys.return_requests) == 0


async def test_entries_a_slow_group_still_needs_are_never_trimmed(redis: Redis, keys: Keys) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    await ensure_group(redis, keys.lend_requests, "audit")  # a slow second consumer group
    ids = [await send(redis, keys, "lend", "ada", [f"b{n}"]) for n in range(5)]
    # lending-service has read and acknowledged everything; audit read two, acked none.
    await redis.xreadgroup(LENDING_GROUP, "w1", {keys.lend_requests: ">"}, count=10)
    await redis.xack(keys.lend_requests, LENDING_GROUP, *ids)
    await redis.xreadgroup("audit", "slow", {keys.lend_requests: ">"}, count=2)

    assert await safe_trim_id(redis, keys.lend_requests) == ids[0]
    await trim(redis, keys, events_maxlen=1000)
    assert await redis.xlen(keys.lend_requests) == 5

    await redis.xack(keys.lend_requests, "audit", ids[0])  # audit acks one: it may go
    await trim(redis, keys, events_maxlen=1000)
    assert [entry_id for entry_id, _ in raw_entries(await redis.xrange(keys.lend_requests))] == ids[1:]


async def test_pending_entries_of_a_dead_consumer_are_kept(redis: Redis, keys: Keys) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    ids = [await send(redis, keys, "lend", "ada", [f"b{n}"]) for n in range(3)]
    await redis.xreadgroup(LENDING_GROUP, "ghost", {keys.lend_requests: ">"}, count=1)  # dies holding ids[0]
    await redis.xreadgroup(LENDING_GROUP, "w1", {keys.lend_requests: ">"}, count=10)
    await redis.xack(keys.lend_requests, LENDING_GROUP, *ids[1:])

    await trim(redis, keys, events_maxlen=1000)

    assert await redis.xlen(keys.lend_requests) == 3  # nothing below the ghost's entry


async def test_nothing_is_trimmed_before_any_group_exists(redis: Redis, keys: Keys) -> None:
    await send(redis, keys, "lend", "ada", ["b1"])
    assert await safe_trim_id(redis, keys.lend_requests) is None
    await trim(redis, keys, events_maxlen=1)
    assert await redis.xlen(keys.lend_requests) == 1


async def test_a_worker_trims_processed_requests(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker(trim_interval_s=0.1)
    entry = await send(redis, keys, "lend", "ada", ["b1"])
    assert (await event_for(redis, keys, "lend", entry)).status == "accepted"
    await wait_until(lambda: _trimmed(redis, keys), timeout_s=5)
    assert await redis.xlen(keys.events) == 1


async def consumers(redis: Redis, stream: str, group: str) -> dict[str, int]:
    """Consumer name -> its pending entries."""
    return {decoded(c["name"]): int(c["pending"]) for c in await redis.xinfo_consumers(stream, group)}


async def test_a_worker_removes_dead_consumers_that_hold_nothing(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    # In every group: "gone", whose worker died, holds nothing; w2 is live and holds
    # nothing. "holder" died holding an entry (not taken over for a minute).
    for stream, group in keys.consumed():
        await ensure_group(redis, stream, group)
        await redis.xgroup_createconsumer(stream, group, "gone")
        await redis.xgroup_createconsumer(stream, group, "w2")
    await send(redis, keys, "return", "bob", ["x"])
    await redis.xreadgroup(LENDING_GROUP, "holder", {keys.return_requests: ">"}, count=1)
    await start_worker(worker_id="w2", claim_idle_ms=60_000)

    await start_worker(claim_idle_ms=60_000, trim_interval_s=0.2)

    async def gone_everywhere() -> bool:
        for stream, group in keys.consumed():
            if "gone" in await consumers(redis, stream, group):
                return False
        return True

    await wait_until(gone_everywhere)
    for stream, group in keys.consumed():
        assert "w2" in await consumers(redis, stream, group), stream
    assert (await consumers(redis, keys.return_requests, LENDING_GROUP))["holder"] == 1
