"""retry_letter.lua: a dead letter's entry queued again, and the letter deleted, only while
the letter is there."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.keys import Keys
from lending.redis.scripts import Scripts

from ..support import decoded, raw_entries


async def test_queues_the_entry_again_and_deletes_the_letter(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    letter = decoded(await redis.xadd(keys.dead_letters, {"stream": keys.lend_requests, "user_id": "ada"}))

    queued = await scripts.retry_letter(
        redis, [keys.dead_letters, keys.lend_requests], [letter, "user_id", "ada", "book_ids", "b1,b2"]
    )

    [(entry_id, fields)] = raw_entries(await redis.xrange(keys.lend_requests))
    assert decoded(queued) == entry_id and fields == {b"user_id": b"ada", b"book_ids": b"b1,b2"}
    assert await redis.xlen(keys.dead_letters) == 0


async def test_a_letter_that_is_gone_queues_nothing(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    other = decoded(await redis.xadd(keys.dead_letters, {"stream": keys.lend_requests}))

    queued = await scripts.retry_letter(redis, [keys.dead_letters, keys.lend_requests], ["1-1", "user_id", "ada"])

    assert queued is None
    assert not await redis.exists(keys.lend_requests)
    assert [decoded(entry_id) for entry_id, _ in raw_entries(await redis.xrange(keys.dead_letters))] == [other]


async def test_a_failing_xadd_leaves_the_letter(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    letter = decoded(await redis.xadd(keys.dead_letters, {"stream": keys.lend_requests}))
    await redis.set(keys.lend_requests, "not a stream")

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await scripts.retry_letter(redis, [keys.dead_letters, keys.lend_requests], [letter, "user_id", "ada"])

    assert await redis.xlen(keys.dead_letters) == 1
