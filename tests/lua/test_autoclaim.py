"""autoclaim.lua and claim.lua: entries are taken over (or delivered again), but an entry
deleted from its stream stays pending and is reported, on Redis 6.2 and 7 alike (Redis
7's XCLAIM and XAUTOCLAIM would drop it from the pending list, and its request would
never get an outcome)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from lending.keys import LENDING_GROUP, Keys
from lending.redis.scripts import Scripts

from ..support import decoded
from .conftest import out_of_memory, pending_entry, pending_on


async def autoclaim(redis: Redis, scripts: Scripts, keys: Keys, idle_ms: int = 0, count: int = 100) -> Any:
    reply = await scripts.autoclaim(redis, [keys.lend_requests], [LENDING_GROUP, "taker", idle_ms, count])
    return [decoded(x) for x in reply[0]], [decoded(x) for x in reply[1]]


async def test_autoclaim_takes_over_idle_entries_of_other_consumers(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    redis = each_server
    first = await pending_entry(redis, keys.lend_requests, consumer="dead")
    second = await pending_entry(redis, keys.lend_requests, consumer="other")

    assert await autoclaim(redis, scripts, keys) == ([first, second], [])

    assert await pending_on(redis, keys.lend_requests, first) == "taker"
    assert await pending_on(redis, keys.lend_requests, second) == "taker"


async def test_autoclaim_leaves_entries_idle_for_less_than_asked(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    redis = each_server
    fresh = await pending_entry(redis, keys.lend_requests, consumer="busy")

    assert await autoclaim(redis, scripts, keys, idle_ms=60_000) == ([], [])

    assert await pending_on(redis, keys.lend_requests, fresh) == "busy"


async def test_autoclaim_reports_a_deleted_entry_and_leaves_it_pending_until_finished(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    redis = each_server
    deleted = await pending_entry(redis, keys.lend_requests, consumer="dead")
    kept = await pending_entry(redis, keys.lend_requests, consumer="dead")
    await redis.xdel(keys.lend_requests, deleted)

    assert await autoclaim(redis, scripts, keys) == ([kept], [deleted])
    # A taker that died before finishing it loses nothing: the next one is told again.
    assert await autoclaim(redis, scripts, keys) == ([kept], [deleted])

    assert await pending_on(redis, keys.lend_requests, deleted) == "dead"


async def test_autoclaim_counts_deleted_entries_in_its_page(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    redis = each_server
    deleted = await pending_entry(redis, keys.lend_requests, consumer="dead")
    first = await pending_entry(redis, keys.lend_requests, consumer="dead")
    await pending_entry(redis, keys.lend_requests, consumer="dead")
    await redis.xdel(keys.lend_requests, deleted)

    assert await autoclaim(redis, scripts, keys, count=2) == ([first], [deleted])


async def test_autoclaim_goes_on_while_redis_is_out_of_memory(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    redis = each_server
    entry = await pending_entry(redis, keys.lend_requests, consumer="dead")
    await scripts.load(redis)

    async with out_of_memory(redis):
        assert await autoclaim(redis, scripts, keys) == ([entry], [])


async def claim(redis: Redis, scripts: Scripts, keys: Keys, *ids: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    entries, deleted = await scripts.claim(redis, [keys.lend_requests], [LENDING_GROUP, "c1", *ids])
    return [(decoded(i), [decoded(f) for f in fields]) for i, fields in entries], [decoded(i) for i in deleted]


async def test_claim_delivers_own_entries_again_with_their_fields_and_a_delivery_counted(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    redis = each_server
    entry = await pending_entry(redis, keys.lend_requests, user_id="ada", book_ids="dune")

    assert await claim(redis, scripts, keys, entry) == ([(entry, ["user_id", "ada", "book_ids", "dune"])], [])

    (row,) = await redis.xpending_range(keys.lend_requests, LENDING_GROUP, min=entry, max=entry, count=1)
    assert int(row["times_delivered"]) == 2


async def test_claim_reports_a_deleted_entry_and_leaves_it_pending(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    redis = each_server
    deleted = await pending_entry(redis, keys.lend_requests)
    kept = await pending_entry(redis, keys.lend_requests)
    await redis.xdel(keys.lend_requests, deleted)

    entries, gone = await claim(redis, scripts, keys, deleted, kept)

    assert ([entry for entry, _ in entries], gone) == ([kept], [deleted])
    assert await pending_on(redis, keys.lend_requests, deleted) == "c1"
