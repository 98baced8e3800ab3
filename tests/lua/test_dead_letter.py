"""dead_letter.lua: park a shelving-returns entry that keeps failing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from lending.keys import SHELVING_GROUP, Keys
from lending.redis.scripts import Arg, Scripts

from .conftest import (
    assert_reads_then_writes,
    assert_unchanged,
    fill_stream,
    finished_entry,
    is_oom,
    is_pending,
    monitored,
    monitored_error,
    out_of_memory,
    pending_entry,
    script_commands,
    snapshot,
    stream_items,
    undelivered_entry,
)

LETTER = ["stream", "returns", "error", "bad entry", "deliveries", "5", "book_ids", "b1,b2"]


async def dead_letter(
    redis: Redis, scripts: Scripts, keys: Keys, entry: str, letter: Sequence[str] = LETTER, maxlen: int = 100
) -> Any:
    args: list[Arg] = [SHELVING_GROUP, entry, maxlen, *letter]
    return await scripts.dead_letter(redis, [keys.shelving_returns, keys.dead_letters, keys.dead_letters_trimmed], args)


async def returns_entry(redis: Redis, keys: Keys) -> str:
    return await pending_entry(redis, keys.shelving_returns, SHELVING_GROUP, book_ids="b1,b2", context_ids="r1,r1")


async def test_dead_letter_parks_and_acks(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await returns_entry(redis, keys)

    assert await dead_letter(redis, scripts, keys, entry) == 1

    assert await stream_items(redis, keys.dead_letters) == [
        [("stream", "returns"), ("error", "bad entry"), ("deliveries", "5"), ("book_ids", "b1,b2")]
    ]
    assert not await is_pending(redis, keys.shelving_returns, entry, SHELVING_GROUP)
    assert not await redis.exists(keys.events, keys.storage, keys.shelving_state)


async def test_dead_letter_caps_the_stream_and_counts_what_it_drops(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    for n in range(3):
        await redis.xadd(keys.dead_letters, {"earlier": str(n)})
    entry = await returns_entry(redis, keys)

    assert await dead_letter(redis, scripts, keys, entry, maxlen=1) == 1

    assert await stream_items(redis, keys.dead_letters) == [
        [("stream", "returns"), ("error", "bad entry"), ("deliveries", "5"), ("book_ids", "b1,b2")]
    ]
    assert await redis.get(keys.dead_letters_trimmed) == b"3"


@pytest.mark.parametrize("value", [["a", "list"], "many"])
async def test_dead_letter_with_a_count_that_is_no_number_changes_nothing(
    redis: Redis, keys: Keys, scripts: Scripts, value: list[str] | str
) -> None:
    entry = await returns_entry(redis, keys)
    if isinstance(value, list):
        await redis.rpush(keys.dead_letters_trimmed, *value)
    else:
        await redis.set(keys.dead_letters_trimmed, value)
    before = await snapshot(redis, keys)

    with pytest.raises(ResponseError, match="not a count"):
        await dead_letter(redis, scripts, keys, entry)

    await assert_unchanged(redis, keys, before)


@pytest.mark.parametrize("how", ["acknowledged", "never_delivered"])
async def test_dead_letter_writes_nothing_when_the_entry_is_not_pending(
    redis: Redis, keys: Keys, scripts: Scripts, how: str
) -> None:
    if how == "acknowledged":
        entry = await finished_entry(redis, keys.shelving_returns, SHELVING_GROUP)
    else:
        await returns_entry(redis, keys)  # the group exists
        entry = await undelivered_entry(redis, keys.shelving_returns)
    before = await snapshot(redis, keys)

    assert await dead_letter(redis, scripts, keys, entry) == 0

    await assert_unchanged(redis, keys, before)


async def test_dead_letter_reads_and_checks_before_its_first_write_an_xadd(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await returns_entry(redis, keys)
    await redis.xadd(keys.dead_letters, {"earlier": "letter"})

    result, commands = await monitored(redis, keys, lambda: dead_letter(redis, scripts, keys, entry))

    assert result == 1
    assert_reads_then_writes(commands, f"XADD {keys.dead_letters}")


async def test_dead_letter_into_a_full_stream_changes_nothing(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    redis = each_server
    entry = await returns_entry(redis, keys)
    await fill_stream(redis, keys.dead_letters)
    before = await snapshot(redis, keys)

    error, commands = await monitored_error(redis, keys, lambda: dead_letter(redis, scripts, keys, entry))

    await assert_unchanged(redis, keys, before)
    assert not [c.text for c in script_commands(commands) if c.writes]
    assert str(error).startswith("STREAMFULL"), str(error)


async def test_dead_letter_out_of_memory_changes_nothing(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    redis = each_server
    entry = await returns_entry(redis, keys)
    await scripts.load(redis)
    before = await snapshot(redis, keys)

    async with out_of_memory(redis):
        error, _ = await monitored_error(redis, keys, lambda: dead_letter(redis, scripts, keys, entry))

    await assert_unchanged(redis, keys, before)
    assert is_oom(error), str(error)
