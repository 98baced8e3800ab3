"""reconcile.lua: give back the shelving grants of finished requests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from lending.keys import LENDING_GROUP, Keys
from lending.redis.scripts import Arg, Scripts

from ..support import hash_of
from .conftest import (
    assert_reads_then_writes,
    assert_unchanged,
    fill_stream,
    finished_entry,
    is_oom,
    monitored,
    monitored_error,
    out_of_memory,
    pending_entry,
    script_commands,
    snapshot,
    stream_fields,
)


async def reconcile(redis: Redis, scripts: Scripts, keys: Keys, pairs: Sequence[tuple[str, str]]) -> Any:
    """reconcile.lua over ``pairs`` of (book, context) as read from the ledger; its reply
    [settled, given back]."""
    args: list[Arg] = [LENDING_GROUP, *(item for pair in pairs for item in pair)]
    return await scripts.reconcile(
        redis, [keys.lend_requests, keys.grants, keys.from_shelving, keys.shelving_returns], args
    )


async def test_reconcile_gives_back_a_grant_of_a_finished_request_the_library_does_not_hold(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": entry, "other": "r9"})

    assert await reconcile(redis, scripts, keys, [("g1", entry)]) == [1, 1]

    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "g1", "context_ids": entry}]
    assert await hash_of(redis, keys.grants) == {"other": "r9"}
    assert not await redis.exists(keys.from_shelving)


async def test_reconcile_settles_without_giving_back_a_grant_the_library_holds_under_that_context(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # The request was finished by another worker, which lent (or stored) the book.
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, "g1", entry)
    await redis.hset(keys.from_shelving, "g1", entry)

    assert await reconcile(redis, scripts, keys, [("g1", entry)]) == [1, 0]

    assert not await redis.exists(keys.grants, keys.shelving_returns)
    assert await hash_of(redis, keys.from_shelving) == {"g1": entry}


async def test_reconcile_gives_back_a_grant_the_library_holds_under_another_context(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # The library's copy came from another hand-out: this one goes back, under its own
    # context (shelving frees the book only if it still has it for that context).
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, "g1", entry)
    await redis.hset(keys.from_shelving, "g1", "r-older")

    assert await reconcile(redis, scripts, keys, [("g1", entry)]) == [1, 1]

    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "g1", "context_ids": entry}]
    assert await hash_of(redis, keys.from_shelving) == {"g1": "r-older"}
    assert not await redis.exists(keys.grants)


@pytest.mark.parametrize("consumer", ["c1", "c2"])
async def test_reconcile_leaves_a_grant_of_a_request_still_pending(
    redis: Redis, keys: Keys, scripts: Scripts, consumer: str
) -> None:
    entry = await pending_entry(redis, keys.lend_requests, consumer=consumer)
    await redis.hset(keys.grants, "g1", entry)
    before = await snapshot(redis, keys)

    assert await reconcile(redis, scripts, keys, [("g1", entry)]) == [0, 0]

    await assert_unchanged(redis, keys, before)


@pytest.mark.parametrize("ledger", [{"g1": "r-new"}, {}], ids=["handed-out-anew", "settled-meanwhile"])
async def test_reconcile_leaves_a_pair_the_ledger_no_longer_names(
    redis: Redis, keys: Keys, scripts: Scripts, ledger: dict[str, str]
) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    for book, context in ledger.items():
        await redis.hset(keys.grants, book, context)
    before = await snapshot(redis, keys)

    assert await reconcile(redis, scripts, keys, [("g1", entry)]) == [0, 0]

    await assert_unchanged(redis, keys, before)


async def test_reconcile_is_idempotent(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})
    await redis.hset(keys.from_shelving, "g2", entry)
    pairs = [("g1", entry), ("g2", entry)]
    assert await reconcile(redis, scripts, keys, pairs) == [2, 1]
    before = await snapshot(redis, keys)

    assert await reconcile(redis, scripts, keys, pairs) == [0, 0]

    await assert_unchanged(redis, keys, before)
    assert await redis.xlen(keys.shelving_returns) == 1


async def test_reconcile_a_page_of_the_ledger(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    done = await finished_entry(redis, keys.lend_requests)
    other_done = await finished_entry(redis, keys.lend_requests)
    running = await pending_entry(redis, keys.lend_requests, consumer="c2")
    await redis.hset(keys.grants, mapping={"g1": done, "g2": running, "g3": done, "g4": other_done, "g5": "r-new"})
    await redis.hset(keys.from_shelving, "g3", done)
    pairs = [("g1", done), ("g2", running), ("g3", done), ("g4", other_done), ("g5", done)]

    assert await reconcile(redis, scripts, keys, pairs) == [3, 2]

    # What goes back goes as one entry, each book with its context, in ledger order.
    assert await stream_fields(redis, keys.shelving_returns) == [
        {"book_ids": "g1,g4", "context_ids": f"{done},{other_done}"}
    ]
    assert await hash_of(redis, keys.grants) == {"g2": running, "g5": "r-new"}


async def test_reconcile_reads_and_checks_everything_before_its_first_write_an_xadd(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})
    await redis.hset(keys.from_shelving, "g2", entry)

    result, commands = await monitored(
        redis, keys, lambda: reconcile(redis, scripts, keys, [("g1", entry), ("g2", entry)])
    )

    assert result == [2, 1]
    assert_reads_then_writes(commands, f"XADD {keys.shelving_returns}")


async def test_reconcile_into_a_full_returns_stream_changes_nothing(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    redis = each_server
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})
    await redis.hset(keys.from_shelving, "g2", entry)
    await fill_stream(redis, keys.shelving_returns)
    before = await snapshot(redis, keys)

    error, commands = await monitored_error(
        redis, keys, lambda: reconcile(redis, scripts, keys, [("g1", entry), ("g2", entry)])
    )

    await assert_unchanged(redis, keys, before)
    assert not [c.text for c in script_commands(commands) if c.writes]
    assert str(error).startswith("STREAMFULL"), str(error)


async def test_reconcile_with_a_full_returns_stream_settles_what_needs_no_give_back(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, "g2", entry)
    await redis.hset(keys.from_shelving, "g2", entry)
    await fill_stream(redis, keys.shelving_returns)

    assert await reconcile(redis, scripts, keys, [("g2", entry)]) == [1, 0]

    assert not await redis.exists(keys.grants)


async def test_reconcile_out_of_memory_changes_nothing(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    redis = each_server
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})
    await redis.hset(keys.from_shelving, "g2", entry)
    await scripts.load(redis)
    before = await snapshot(redis, keys)

    async with out_of_memory(redis):
        error, _ = await monitored_error(
            redis, keys, lambda: reconcile(redis, scripts, keys, [("g1", entry), ("g2", entry)])
        )

    await assert_unchanged(redis, keys, before)
    assert is_oom(error), str(error)
