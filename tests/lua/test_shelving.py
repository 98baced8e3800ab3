"""shelving_get.lua and shelving_release.lua: the shelving service mock."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from lending.keys import SHELVING_GROUP, Keys
from lending.redis.scripts import Arg, Scripts

from ..support import hash_of
from .conftest import assert_unchanged, is_pending, out_of_memory, pending_entry, snapshot

# -- shelving_get.lua ----------------------------------------------------------------------


def get_keys(keys: Keys) -> list[str]:
    return [keys.shelving_state, keys.grants]


async def test_shelving_get_hands_out_idempotently_per_context(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    assert await scripts.shelving_get(redis, get_keys(keys), ["b1", "r1", "b2", "r1"]) == [1, 1]
    assert await scripts.shelving_get(redis, get_keys(keys), ["b1", "r1", "b3", "r1"]) == [2, 1]
    codes = await scripts.shelving_get(redis, get_keys(keys), ["b1", "r2", "b2", "r2", "b3", "r2", "b4", "r2"])
    assert codes == [0, 0, 0, 1]
    assert await hash_of(redis, keys.shelving_state) == {"b1": "r1", "b2": "r1", "b3": "r1", "b4": "r2"}


async def test_shelving_get_answers_each_pair_for_its_own_context(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.hset(keys.shelving_state, mapping={"h1": "r1", "h2": "r2"})

    codes = await scripts.shelving_get(
        redis, get_keys(keys), ["h1", "r1", "h2", "r1", "n1", "r1", "h2", "r2", "n2", "r2", "h1", "r3"]
    )

    assert codes == [2, 0, 1, 2, 1, 0]
    assert await hash_of(redis, keys.shelving_state) == {"h1": "r1", "h2": "r2", "n1": "r1", "n2": "r2"}


@pytest.mark.parametrize(("first", "second"), [("r1", "r2"), ("r2", "r1")])
async def test_shelving_get_book_asked_twice_in_one_call_first_wins(
    redis: Redis, keys: Keys, scripts: Scripts, first: str, second: str
) -> None:
    codes = await scripts.shelving_get(redis, get_keys(keys), ["b1", first, "b1", second])

    assert codes == [1, 0]
    assert await hash_of(redis, keys.shelving_state) == {"b1": first}
    assert await hash_of(redis, keys.grants) == {"b1": first}


async def test_shelving_get_book_asked_twice_in_one_call_for_one_context(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    assert await scripts.shelving_get(redis, get_keys(keys), ["b1", "r1", "b1", "r1"]) == [1, 2]
    assert await hash_of(redis, keys.shelving_state) == {"b1": "r1"}
    assert await hash_of(redis, keys.grants) == {"b1": "r1"}


async def test_shelving_get_records_every_new_grant_in_the_ledger(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    # The ledger already names a grant the library has not settled yet: it stays.
    await redis.hset(keys.grants, "old", "r0")

    codes = await scripts.shelving_get(redis, get_keys(keys), ["n1", "r1", "n2", "r2", "n3", "r1"])

    assert codes == [1, 1, 1]
    assert await hash_of(redis, keys.grants) == {"old": "r0", "n1": "r1", "n2": "r2", "n3": "r1"}
    assert await hash_of(redis, keys.shelving_state) == {"n1": "r1", "n2": "r2", "n3": "r1"}


async def test_shelving_get_writes_nothing_for_held_and_refused_books(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # h1 is handed to r1 (a repeat asks again); o1 to r9 (refused). The ledger entry of
    # h1 was settled since (the book lent): asking again must not bring it back.
    await redis.hset(keys.shelving_state, mapping={"h1": "r1", "o1": "r9"})
    await redis.hset(keys.grants, "o1", "r9")
    before = await snapshot(redis, keys)

    assert await scripts.shelving_get(redis, get_keys(keys), ["h1", "r1", "o1", "r1"]) == [2, 0]

    await assert_unchanged(redis, keys, before)


async def test_shelving_get_mixed_call_records_only_the_new_grants(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.hset(keys.shelving_state, mapping={"h1": "r1", "o1": "r9"})

    codes = await scripts.shelving_get(redis, get_keys(keys), ["h1", "r1", "n1", "r1", "o1", "r1", "n2", "r1"])

    assert codes == [2, 1, 0, 1]
    assert await hash_of(redis, keys.grants) == {"n1": "r1", "n2": "r1"}
    assert await hash_of(redis, keys.shelving_state) == {"h1": "r1", "o1": "r9", "n1": "r1", "n2": "r1"}


# -- shelving_release.lua ------------------------------------------------------------------


def release_keys(keys: Keys) -> list[str]:
    return [keys.shelving_returns, keys.shelving_state]


async def test_shelving_release_acks_and_frees_books_once(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.hset(keys.shelving_state, mapping={"b1": "r1", "b2": "r1", "kept": "r1"})
    entry = await pending_entry(redis, keys.shelving_returns, SHELVING_GROUP, book_ids="b1,b2")

    assert await scripts.shelving_release(redis, release_keys(keys), [SHELVING_GROUP, entry, 2, "b1", "b2"]) == 1
    assert await hash_of(redis, keys.shelving_state) == {"kept": "r1"}
    assert not await is_pending(redis, keys.shelving_returns, entry, SHELVING_GROUP)

    # b1 handed out again since: a late second release must not free it.
    await redis.hset(keys.shelving_state, "b1", "r9")
    assert await scripts.shelving_release(redis, release_keys(keys), [SHELVING_GROUP, entry, 2, "b1", "b2"]) == 0
    assert await hash_of(redis, keys.shelving_state) == {"kept": "r1", "b1": "r9"}


async def test_shelving_release_frees_a_book_only_for_the_context_it_comes_back_from(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # b1 was handed back twice for r1 and handed out to r9 in between: keep r9's.
    await redis.hset(keys.shelving_state, mapping={"b1": "r9", "b2": "r1"})
    entry = await pending_entry(redis, keys.shelving_returns, SHELVING_GROUP, book_ids="b1,b2")
    args: list[Arg] = [SHELVING_GROUP, entry, 2, "b1", "b2", "r1", "r1"]

    assert await scripts.shelving_release(redis, release_keys(keys), args) == 1

    assert await hash_of(redis, keys.shelving_state) == {"b1": "r9"}


async def test_shelving_release_of_an_entry_without_books(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.hset(keys.shelving_state, "b1", "r1")
    entry = await pending_entry(redis, keys.shelving_returns, SHELVING_GROUP, book_ids="")

    assert await scripts.shelving_release(redis, release_keys(keys), [SHELVING_GROUP, entry, 0]) == 1

    assert await hash_of(redis, keys.shelving_state) == {"b1": "r1"}


async def test_shelving_release_goes_on_while_redis_is_out_of_memory(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    # Giving books back frees memory: allow-oom on Redis 7, XACK and HDEL on 6.2.
    redis = each_server
    await redis.hset(keys.shelving_state, mapping={"b1": "r1", "b2": "r1"})
    entry = await pending_entry(redis, keys.shelving_returns, SHELVING_GROUP, book_ids="b1")
    await scripts.load(redis)

    async with out_of_memory(redis):
        assert await scripts.shelving_release(redis, release_keys(keys), [SHELVING_GROUP, entry, 1, "b1", "r1"]) == 1

    assert await hash_of(redis, keys.shelving_state) == {"b2": "r1"}
    assert not await is_pending(redis, keys.shelving_returns, entry, SHELVING_GROUP)
