"""forget_consumers.lua: remove the consumers of a group that hold nothing and whose
worker is not live; never one that holds entries, never a live worker's."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.keys import LENDING_GROUP, Keys
from lending.redis.scripts import Scripts

from ..support import decoded
from .conftest import (
    assert_unchanged,
    is_oom,
    is_pending,
    out_of_memory,
    pending_entry,
    server_major,
    snapshot,
)


async def forget(redis: Redis, scripts: Scripts, keys: Keys, *names: str) -> Any:
    return await scripts.forget_consumers(
        redis, [keys.lend_requests, *(keys.worker(name) for name in names)], [LENDING_GROUP, *names]
    )


async def consumers(redis: Redis, keys: Keys) -> dict[str, int]:
    return {
        decoded(c["name"]): int(c["pending"]) for c in await redis.xinfo_consumers(keys.lend_requests, LENDING_GROUP)
    }


async def test_only_dead_consumers_that_hold_nothing_go(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    redis = each_server
    held = await pending_entry(redis, keys.lend_requests, consumer="dead-holder")
    for name in ("dead-idle", "live-idle"):
        await redis.xgroup_createconsumer(keys.lend_requests, LENDING_GROUP, name)
    await redis.set(keys.worker("live-idle"), "token", px=10_000)

    removed = await forget(redis, scripts, keys, "dead-idle", "dead-holder", "live-idle", "never-was")

    assert [decoded(name) for name in removed] == ["dead-idle", "never-was"]
    assert await consumers(redis, keys) == {"dead-holder": 1, "live-idle": 0}
    assert await is_pending(redis, keys.lend_requests, held)


async def test_out_of_memory_it_removes_on_redis_7_and_changes_nothing_on_6(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    # Redis 7 lets a script flagged allow-oom delete; Redis 6.2 refuses XGROUP as a whole
    # while out of memory (the command is flagged use-memory): the next round removes it.
    redis = each_server
    await pending_entry(redis, keys.lend_requests, consumer="dead-holder")
    await redis.xgroup_createconsumer(keys.lend_requests, LENDING_GROUP, "dead-idle")
    await scripts.load(redis)
    before = await snapshot(redis, keys)

    async with out_of_memory(redis):
        if await server_major(redis) >= 7:
            assert [decoded(name) for name in await forget(redis, scripts, keys, "dead-idle")] == ["dead-idle"]
        else:
            with pytest.raises(ResponseError) as error:
                await forget(redis, scripts, keys, "dead-idle")
            assert is_oom(error.value), str(error.value)

    if await server_major(redis) >= 7:
        assert await consumers(redis, keys) == {"dead-holder": 1}
    else:
        await assert_unchanged(redis, keys, before)
