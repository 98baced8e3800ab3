"""ScriptBatcher, as the API runs api_submit.lua: the calls of one turn of the event loop
in one pipeline, each answered on its own."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from lending.api.submission import Submitted, submit
from lending.domain.requests import BookRequest
from lending.keys import Keys
from lending.redis.batching import ScriptBatcher
from lending.redis.connection import make_client
from lending.redis.embedded import free_port
from lending.redis.scripts import Scripts


def lend(user: str) -> BookRequest:
    return BookRequest("lend", "", user, ("b1",))


async def test_concurrent_calls_share_one_pipeline(redis: Redis, keys: Keys) -> None:
    batcher = ScriptBatcher(redis, Scripts().api_submit)

    done = await asyncio.gather(*(submit(batcher, keys, lend(f"user-{n}")) for n in range(50)))

    assert (batcher.batches, batcher.calls) == (1, 50)
    assert len({d.request_id for d in done}) == 50
    assert await redis.xlen(keys.lend_requests) == 50


async def test_calls_of_later_turns_go_in_later_pipelines(redis: Redis, keys: Keys) -> None:
    batcher = ScriptBatcher(redis, Scripts().api_submit, max_batch=4)

    await asyncio.gather(*(submit(batcher, keys, lend(f"user-{n}")) for n in range(10)))
    await submit(batcher, keys, lend("later"))

    assert (batcher.batches, batcher.calls) == (4, 11)  # 4 + 4 + 2, then 1


async def test_a_failing_call_fails_alone(redis: Redis, keys: Keys) -> None:
    batcher = ScriptBatcher(redis, Scripts().api_submit)
    await redis.set(keys.return_requests, "not a stream")

    good, bad = await asyncio.gather(
        submit(batcher, keys, lend("ada")),
        submit(batcher, keys, BookRequest("return", "", "ada", ("b1",))),
        return_exceptions=True,
    )

    assert isinstance(good, Submitted) and isinstance(bad, ResponseError) and "WRONGTYPE" in str(bad)
    assert batcher.batches == 1


async def test_a_forgotten_script_is_loaded_again(redis: Redis, keys: Keys) -> None:
    batcher = ScriptBatcher(redis, Scripts().api_submit)
    await submit(batcher, keys, lend("ada"))
    await redis.script_flush()

    again = await asyncio.gather(*(submit(batcher, keys, lend(f"user-{n}")) for n in range(3)))

    assert len(again) == 3 and await redis.xlen(keys.lend_requests) == 4


async def test_a_lost_connection_fails_every_call_of_the_batch(keys: Keys) -> None:
    client = make_client(f"redis://127.0.0.1:{free_port()}")
    batcher = ScriptBatcher(client, Scripts().api_submit)
    try:
        results = await asyncio.gather(
            *(submit(batcher, keys, lend(f"u{n}")) for n in range(3)), return_exceptions=True
        )
    finally:
        await client.aclose()

    assert all(isinstance(result, RedisConnectionError) for result in results), results


async def test_a_caller_that_gives_up_does_not_disturb_the_others(redis: Redis, keys: Keys) -> None:
    batcher = ScriptBatcher(redis, Scripts().api_submit)
    impatient = asyncio.create_task(submit(batcher, keys, lend("impatient")))
    patient = asyncio.create_task(submit(batcher, keys, lend("patient")))
    await asyncio.sleep(0)
    impatient.cancel()

    assert isinstance(await patient, Submitted)
    with pytest.raises(asyncio.CancelledError):
        await impatient
