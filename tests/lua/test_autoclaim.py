"""autoclaim.lua and claim.lua: entries are taken over (or delivered again), but an entry
deleted from its stream stays pending and is reported, on Redis 6.2 and 7 alike (Redis
7's XCLAIM and XAUTOCLAIM would drop it from the pending list, and its request would
never get an outcome)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from lending.keys import LENDING_GROUP, Keys
from lending.redis.consumer import SCRIPT_IDS, ensure_group
from lending.redis.scripts import Scripts

from ..support import decoded
from .conftest import out_of_memory, pending_entry, pending_on


async def autoclaim(
    redis: Redis, scripts: Scripts, keys: Keys, idle_ms: int = 0, count: int = 100, cursor: str = "-"
) -> Any:
    """(claimed ids, deleted ids) of one page; the next page's cursor is left out."""
    return (await autoclaim_page(redis, scripts, keys, idle_ms, count, cursor))[:2]


async def autoclaim_page(
    redis: Redis, scripts: Scripts, keys: Keys, idle_ms: int = 0, count: int = 100, cursor: str = "-"
) -> tuple[list[str], list[str], str]:
    reply = await scripts.autoclaim(redis, [keys.lend_requests], [LENDING_GROUP, "taker", idle_ms, count, cursor])
    return [decoded(x) for x in reply[0]], [decoded(x) for x in reply[1]], decoded(reply[2])


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


async def test_autoclaim_pages_past_deleted_entries_with_its_cursor(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Deleted entries stay pending and idle: without a cursor they would fill every page,
    and the entries behind them would never be taken over."""
    redis = each_server
    deleted = [await pending_entry(redis, keys.lend_requests, consumer="dead") for _ in range(3)]
    live = await pending_entry(redis, keys.lend_requests, consumer="dead")
    await redis.xdel(keys.lend_requests, *deleted)

    first = await autoclaim_page(redis, scripts, keys, count=2)
    second = await autoclaim_page(redis, scripts, keys, count=2, cursor=first[2])

    assert first == ([], deleted[:2], f"({deleted[1]}")
    assert second == ([live], deleted[2:], f"({live}")
    assert await autoclaim_page(redis, scripts, keys, count=2, cursor=second[2]) == ([], [], "")
    assert await pending_on(redis, keys.lend_requests, live) == "taker"


async def test_autoclaim_says_a_page_that_is_not_full_was_the_last(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    redis = each_server
    entry = await pending_entry(redis, keys.lend_requests, consumer="dead")

    assert await autoclaim_page(redis, scripts, keys, count=2) == ([entry], [], "")


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


async def test_claim_takes_as_many_ids_as_the_consumer_sends_at_once(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Lua's unpack() fails at about 8,000 values: the consumer sends SCRIPT_IDS at most."""
    redis = each_server
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(SCRIPT_IDS):
            pipe.xadd(keys.lend_requests, {"user_id": "ada", "book_ids": "b1"})
        ids = [decoded(entry_id) for entry_id in await pipe.execute()]
    await redis.xreadgroup(LENDING_GROUP, "c1", {keys.lend_requests: ">"}, count=SCRIPT_IDS)

    entries, deleted = await claim(redis, scripts, keys, *ids)

    assert ([entry for entry, _ in entries], deleted) == (ids, [])
