"""A request entry deleted from its stream while a worker holds it (an operator's XDEL,
a trim): it can never be processed, but what its request holds must go back, and its
sender must get an outcome."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from lending.keys import LENDING_GROUP, Keys
from lending.redis.connection import make_client
from lending.redis.consumer import CLAIM_PAGE
from lending.settings import Settings

from .support import decoded, event_for, in_process_worker, members, send, wait_until


@pytest.fixture(params=["default", "redis7"])
async def server(request: pytest.FixtureRequest, redis_url: str, keys: Keys) -> AsyncIterator[tuple[Redis, str]]:
    """The default test Redis (6.2 keeps a deleted entry in the pending list) and a Redis 7
    (which drops it from there when it is claimed)."""
    url = request.getfixturevalue("redis7_url") if request.param == "redis7" else redis_url
    client = make_client(url)
    yield client, url
    async for key in client.scan_iter(match=keys.pattern("*"), count=1000):
        await client.delete(key)
    await client.aclose()


async def test_a_lend_deleted_while_a_frozen_worker_held_it_gives_its_reserved_books_back(
    server: tuple[Redis, str], keys: Keys, settings: Settings
) -> None:
    """A worker reserved the storage's copy, froze past claim-idle, and the entry was
    deleted meanwhile: the book stayed in the reservation for ever, with no outcome."""
    redis, url = server
    await redis.sadd(keys.storage, "dune")
    request_id = await send(redis, keys, "lend", "ada", ["dune", "solaris"])
    await redis.xgroup_create(keys.lend_requests, LENDING_GROUP, id="0")
    await redis.xreadgroup(LENDING_GROUP, "frozen", {keys.lend_requests: ">"})
    await redis.smove(keys.storage, keys.reservation(request_id), "dune")  # as reserve.lua does
    await redis.xdel(keys.lend_requests, request_id)

    async with in_process_worker(settings.replace(redis_url=url, claim_idle_ms=100)):
        event = await event_for(redis, keys, "lend", request_id)
        await wait_until(lambda: _stored(redis, keys, "dune"))

    assert (event.status, event.user_id) == ("failed", "")
    assert "deleted from its stream" in event.reason
    assert not await redis.exists(keys.reservation(request_id))
    assert await redis.xlen(keys.dead_letters) == 1
    assert (await redis.xpending(keys.lend_requests, LENDING_GROUP))["pending"] == 0


async def _stored(redis: Redis, keys: Keys, book: str) -> bool:
    return book in await members(redis, keys.storage)


@pytest.mark.parametrize("action", ["lend", "return"])
async def test_a_request_deleted_while_a_dead_worker_held_it_gets_a_failed_outcome(
    server: tuple[Redis, str], keys: Keys, settings: Settings, action: str
) -> None:
    """Nothing reserved yet (a return never reserves): on Redis 7 the take-over used to drop
    the entry from the pending list, and its sender never heard of it again."""
    redis, url = server
    request_id = await send(redis, keys, action, "ada", ["dune"])
    stream = keys.requests(action)
    await redis.xgroup_create(stream, LENDING_GROUP, id="0")
    await redis.xreadgroup(LENDING_GROUP, "dead", {stream: ">"})
    await redis.xdel(stream, request_id)

    async with in_process_worker(settings.replace(redis_url=url, claim_idle_ms=100)):
        event = await event_for(redis, keys, action, request_id)
        await wait_until(lambda: _nothing_pending(redis, stream))

    assert (event.status, event.action) == ("failed", action)
    assert "deleted from its stream" in event.reason
    assert await redis.xlen(keys.dead_letters) == 1


async def test_a_request_deleted_while_pending_on_this_worker_from_an_earlier_run_gets_a_failed_outcome(
    server: tuple[Redis, str], keys: Keys, settings: Settings
) -> None:
    """Resuming its own entries, the worker claims them again (a delivery counted): on
    Redis 7 that claim used to drop a deleted one from the pending list."""
    redis, url = server
    settings = settings.replace(redis_url=url, claim_idle_ms=100, retry_base_ms=100)
    request_id = await send(redis, keys, "return", "ada", ["dune"])
    await redis.xgroup_create(keys.return_requests, LENDING_GROUP, id="0")
    await redis.xreadgroup(LENDING_GROUP, settings.worker_id, {keys.return_requests: ">"})
    await redis.xdel(keys.return_requests, request_id)

    async with in_process_worker(settings):
        event = await event_for(redis, keys, "return", request_id)
        await wait_until(lambda: _nothing_pending(redis, keys.return_requests))

    assert event.status == "failed"
    assert await redis.xlen(keys.dead_letters) == 1


async def _nothing_pending(redis: Redis, stream: str) -> bool:
    return int((await redis.xpending(stream, LENDING_GROUP))["pending"]) == 0


async def test_a_live_entry_behind_more_deleted_ones_than_a_page_is_still_taken_over(
    server: tuple[Redis, str], keys: Keys, settings: Settings
) -> None:
    """Deleted entries stay pending and idle: they filled every page of the take-over, and
    the dead worker's live entry behind them was never taken over."""
    redis, url = server
    await redis.xgroup_create(keys.lend_requests, LENDING_GROUP, id="0", mkstream=True)
    async with redis.pipeline(transaction=False) as pipe:
        for k in range(CLAIM_PAGE + 50):
            pipe.xadd(keys.lend_requests, {"user_id": f"u{k}", "book_ids": f"b{k}"})
        deleted = [decoded(entry_id) for entry_id in await pipe.execute()]
    live = await send(redis, keys, "lend", "ada", ["dune"])
    await redis.xreadgroup(LENDING_GROUP, "dead", {keys.lend_requests: ">"})
    await redis.xdel(keys.lend_requests, *deleted)

    async with in_process_worker(settings.replace(redis_url=url, claim_idle_ms=100)):
        assert (await event_for(redis, keys, "lend", live)).status == "accepted"
        await wait_until(lambda: _nothing_pending(redis, keys.lend_requests), timeout_s=30)

    assert await redis.xlen(keys.dead_letters) == len(deleted)


async def test_the_take_over_goes_on_next_time_from_where_it_stopped(
    server: tuple[Redis, str], keys: Keys, settings: Settings
) -> None:
    """One take-over reads at most 10 pages of a stream: with more deleted entries than
    that ahead (a worker finishes only as many at once as it has room for), starting over
    each time never reached the live entry behind them."""
    redis, url = server
    await redis.xgroup_create(keys.lend_requests, LENDING_GROUP, id="0", mkstream=True)
    async with redis.pipeline(transaction=False) as pipe:
        for k in range(20 * CLAIM_PAGE + 50):
            pipe.xadd(keys.lend_requests, {"user_id": f"u{k}", "book_ids": f"b{k}"})
        deleted = [decoded(entry_id) for entry_id in await pipe.execute()]
    live = await send(redis, keys, "lend", "ada", ["dune"])
    await redis.xreadgroup(LENDING_GROUP, "dead", {keys.lend_requests: ">"})
    await redis.xdel(keys.lend_requests, *deleted)

    # Room for one entry at a time: the deleted ones go slowly, one per take-over.
    async with in_process_worker(settings.replace(redis_url=url, claim_idle_ms=100, concurrency=1)):
        # 2,050 dead letters one at a time first: about 5 s here, more on a loaded CI
        # machine. This asserts that it gets there, not how fast.
        assert (await event_for(redis, keys, "lend", live, timeout_s=60)).status == "accepted"
