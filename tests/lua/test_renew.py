"""renew.lua: a live consumer keeps its entries by resetting their idle time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from lending.domain.streamids import id_range
from lending.keys import LENDING_GROUP, Keys
from lending.redis.scripts import Arg, Scripts

from ..support import decoded
from .conftest import finished_entry, is_pending, out_of_memory, pending_entry

LONG_IDLE_MS = 600_000


async def renew(redis: Redis, scripts: Scripts, keys: Keys, ids: Sequence[str], consumer: str = "c1") -> Any:
    args: list[Arg] = [LENDING_GROUP, consumer, *id_range(ids), *ids]
    return await scripts.renew(redis, [keys.lend_requests], args)


async def held_long(redis: Redis, keys: Keys, consumer: str, deliveries: int = 1) -> str:
    """An entry pending on ``consumer`` for ten minutes, delivered ``deliveries`` times."""
    entry = await pending_entry(redis, keys.lend_requests, consumer=consumer)
    await redis.xclaim(
        keys.lend_requests,
        LENDING_GROUP,
        consumer,
        0,
        [entry],
        idle=LONG_IDLE_MS,
        retrycount=deliveries,
        justid=True,
    )
    return entry


async def pel(redis: Redis, keys: Keys) -> dict[str, tuple[str, int, int]]:
    """entry -> (consumer, idle ms, times delivered), for every pending entry."""
    rows = await redis.xpending_range(keys.lend_requests, LENDING_GROUP, min="-", max="+", count=1000)
    return {
        decoded(row["message_id"]): (
            decoded(row["consumer"]),
            int(row["time_since_delivered"]),
            int(row["times_delivered"]),
        )
        for row in rows
    }


async def test_renew_resets_the_idle_time_of_the_listed_entries_of_this_consumer(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    first = await held_long(redis, keys, "c1")
    second = await held_long(redis, keys, "c1", deliveries=3)
    unlisted = await held_long(redis, keys, "c1")
    before = await pel(redis, keys)
    assert all(idle >= LONG_IDLE_MS for _, idle, _ in before.values())

    assert await renew(redis, scripts, keys, [first, second]) == 2

    after = await pel(redis, keys)
    for entry in (first, second):
        consumer, idle, deliveries = after[entry]
        assert consumer == "c1"
        assert idle < 10_000
        assert deliveries == before[entry][2], "renewing counts no delivery"
    assert after[unlisted][1] >= LONG_IDLE_MS
    assert after[unlisted][2] == before[unlisted][2]


async def test_renew_never_touches_entries_pending_on_another_consumer(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # c2 took over the entry: c1 still lists it, and must not take it back.
    mine = await held_long(redis, keys, "c1")
    taken = await held_long(redis, keys, "c2", deliveries=2)
    before = await pel(redis, keys)

    assert await renew(redis, scripts, keys, [mine, taken]) == 1

    after = await pel(redis, keys)
    assert after[taken][0] == "c2"
    assert after[taken][1] >= LONG_IDLE_MS
    assert after[taken][2] == before[taken][2]
    assert after[mine][1] < 10_000


async def test_renew_does_not_bring_back_an_acknowledged_entry(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    done = await finished_entry(redis, keys.lend_requests)

    assert await renew(redis, scripts, keys, [done]) == 0

    assert not await is_pending(redis, keys.lend_requests, done)


async def test_renew_goes_on_while_redis_is_out_of_memory(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    # allow-oom on Redis 7; on 6.2 XCLAIM is never refused for memory.
    redis = each_server
    entry = await held_long(redis, keys, "c1")
    await scripts.load(redis)

    async with out_of_memory(redis):
        assert await renew(redis, scripts, keys, [entry]) == 1

    assert (await pel(redis, keys))[entry][1] < 10_000


async def test_renew_leaves_a_deleted_entry_pending(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    """Redis 7's XCLAIM drops a deleted entry from the pending list: the commit of one in
    flight would then find it finished, and leave its reservation behind."""
    redis = each_server
    deleted = await held_long(redis, keys, "c1")
    kept = await held_long(redis, keys, "c1")
    await redis.xdel(keys.lend_requests, deleted)

    assert await renew(redis, scripts, keys, [deleted, kept]) == 1

    after = await pel(redis, keys)
    assert after[deleted][0] == "c1"
    assert after[kept][1] < 10_000
