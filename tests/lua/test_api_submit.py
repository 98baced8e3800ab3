"""api_submit.lua: queue an API request, at most once per idempotency key.

The tests lay out KEYS and ARGV with ``submit_call``, the API's own encoder.
"""

from __future__ import annotations

from functools import partial

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.api.submission import Submitted, fingerprint, submit, submit_call, submitted
from lending.domain.requests import BookRequest
from lending.keys import Keys
from lending.redis.scripts import Scripts

from .conftest import (
    assert_reads_then_writes,
    assert_unchanged,
    fill_stream,
    is_oom,
    monitored,
    monitored_error,
    out_of_memory,
    script_commands,
    snapshot,
    stream_items,
)

ADA = BookRequest("lend", "", "ada", ("b1", "b2"))


async def run(redis: Redis, scripts: Scripts, keys: Keys, request: BookRequest, key: str | None = None) -> Submitted:
    script_keys, args = submit_call(keys, request, key, 60)
    return submitted(await scripts.api_submit(redis, script_keys, args))


async def test_without_a_key_each_call_queues_a_request(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    first = await run(redis, scripts, keys, ADA)
    second = await run(redis, scripts, keys, ADA)

    assert first.request_id != second.request_id
    assert not (first.replayed or first.key_reused)
    assert await stream_items(redis, keys.lend_requests) == [[("user_id", "ada"), ("book_ids", "b1,b2")]] * 2
    assert not await redis.exists(keys.return_requests)


async def test_a_key_queues_once_and_names_its_request_for_a_day(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    first = await run(redis, scripts, keys, ADA, "key-1")
    again = await run(redis, scripts, keys, ADA, "key-1")

    assert first == Submitted(first.request_id)
    assert again == Submitted(first.request_id, replayed=True)
    assert await redis.xlen(keys.lend_requests) == 1
    assert await redis.get(keys.idempotency("key-1")) == f"{first.request_id} {fingerprint(ADA)}".encode()
    assert 0 < await redis.ttl(keys.idempotency("key-1")) <= 60


async def test_a_key_reused_with_another_body_queues_nothing(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    first = await run(redis, scripts, keys, ADA, "key-1")
    before = await snapshot(redis, keys)

    for other in (
        BookRequest("lend", "", "ada", ("b1",)),
        BookRequest("lend", "", "bob", ("b1", "b2")),
        BookRequest("return", "", "ada", ("b1", "b2")),
    ):
        assert await run(redis, scripts, keys, other, "key-1") == Submitted(first.request_id, key_reused=True)

    await assert_unchanged(redis, keys, before)


async def test_a_key_holding_something_else_is_never_the_same_request(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    await redis.set(keys.idempotency("key-1"), "garbage")
    before = await snapshot(redis, keys)

    assert await run(redis, scripts, keys, ADA, "key-1") == Submitted("garbage", key_reused=True)

    await assert_unchanged(redis, keys, before)


async def test_the_request_goes_to_the_stream_of_its_action(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    done = await submit(partial(scripts.api_submit, redis), keys, BookRequest("return", "", "ada", ("b1",)), "key-2")

    assert await stream_items(redis, keys.return_requests) == [[("user_id", "ada"), ("book_ids", "b1")]]
    assert not await redis.exists(keys.lend_requests)
    stored = await redis.get(keys.idempotency("key-2"))
    assert isinstance(stored, bytes) and stored.startswith(done.request_id.encode() + b" ")


async def test_reads_before_its_first_write_an_xadd(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    result, commands = await monitored(redis, keys, lambda: run(redis, scripts, keys, ADA, "key-1"))

    assert not result.replayed
    assert_reads_then_writes(commands, f"XADD {keys.lend_requests}")
    assert [c.name for c in script_commands(commands)] == ["GET", "XADD", "SET"]


async def test_a_full_stream_keeps_no_key(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    redis = each_server
    await fill_stream(redis, keys.lend_requests)
    before = await snapshot(redis, keys)

    error, commands = await monitored_error(redis, keys, lambda: run(redis, scripts, keys, ADA, "key-1"))

    await assert_unchanged(redis, keys, before)
    # The XADD is the check: refused, it is the last command the script ran.
    assert [c.name for c in script_commands(commands)] == ["GET", "XADD"]
    assert "exhausted" in str(error), str(error)


async def test_a_stream_of_the_wrong_type_keeps_no_key(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.set(keys.lend_requests, "not a stream")
    before = await snapshot(redis, keys)

    try:
        await run(redis, scripts, keys, ADA, "key-1")
    except ResponseError as exc:
        assert "WRONGTYPE" in str(exc), str(exc)
    else:
        raise AssertionError("no error")

    await assert_unchanged(redis, keys, before)


async def test_out_of_memory_queues_nothing(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    redis = each_server
    await scripts.api_submit.load(redis)
    before = await snapshot(redis, keys)

    async with out_of_memory(redis):
        error, _ = await monitored_error(redis, keys, lambda: run(redis, scripts, keys, ADA, "key-1"))

    await assert_unchanged(redis, keys, before)
    assert is_oom(error), str(error)
