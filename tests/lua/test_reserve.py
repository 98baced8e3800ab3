"""reserve.lua: reserve a batch's books from storage, and read counts and holders."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from redis.asyncio import Redis

from lending.domain.streamids import id_range
from lending.keys import LENDING_GROUP, Keys
from lending.redis.scripts import Arg, Scripts

from ..support import decoded, hash_of, members
from .conftest import finished_entry, pending_entry, pending_on, undelivered_entry

Request = tuple[str, int, Sequence[str]]


def reserve_call(keys: Keys, requests: Sequence[Request], consumer: str = "c1") -> tuple[list[str], list[Arg]]:
    """reserve.lua's KEYS and ARGV for ``requests``: (entry id, retry flag, books) each."""
    ids = [entry for entry, _, _ in requests]
    args: list[Arg] = [LENDING_GROUP, consumer, *id_range(ids), len(requests)]
    for entry, retry, books in requests:
        args += [entry, retry, len(books), *books]
    return [keys.lend_requests, keys.lent_books, keys.storage, *(keys.reservation(i) for i in ids)], args


async def reserve(redis: Redis, scripts: Scripts, keys: Keys, *requests: Request) -> list[str]:
    codes, counts, holders = await scripts.reserve(redis, *reserve_call(keys, requests))
    assert counts == [] and holders == []
    return [decoded(c) for c in codes]


async def peek(
    redis: Redis, scripts: Scripts, keys: Keys, users: Sequence[str], books: Sequence[str]
) -> list[list[str]]:
    """reserve.lua with no lend requests: only the reads of counts and holders."""
    reply = await scripts.reserve(
        redis,
        [keys.lend_requests, keys.lent_books, keys.storage, *(keys.user_count(u) for u in users)],
        [LENDING_GROUP, "c1", "", "", 0, *books],
    )
    assert reply[0] == []
    return [[decoded(v) for v in side] for side in reply[1:]]


async def test_reserve_codes_per_book(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.lent_books, mapping={"lent": "bob", "mine": "ada"})
    await redis.sadd(keys.storage, "stored1", "stored2", "other")

    codes = await reserve(redis, scripts, keys, (entry, 0, ["lent", "stored1", "nowhere", "mine", "stored2"]))

    assert codes == ["01201"]
    assert await members(redis, keys.reservation(entry)) == {"stored1", "stored2"}
    assert await members(redis, keys.storage) == {"other"}  # SMOVEd, not copied
    assert await hash_of(redis, keys.lent_books) == {"lent": "bob", "mine": "ada"}


async def test_reserve_answers_each_request_of_the_batch(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    first = await pending_entry(redis, keys.lend_requests)
    second = await pending_entry(redis, keys.lend_requests)
    third = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.lent_books, "l1", "bob")
    await redis.sadd(keys.storage, "a", "b", "c")

    codes = await reserve(
        redis, scripts, keys, (first, 0, ["a", "x"]), (second, 0, ["l1"]), (third, 0, ["y", "c", "b"])
    )

    assert codes == ["12", "0", "211"]
    assert await members(redis, keys.reservation(first)) == {"a"}
    assert not await redis.exists(keys.reservation(second))
    assert await members(redis, keys.reservation(third)) == {"b", "c"}
    assert not await redis.exists(keys.storage)


@pytest.mark.parametrize("older_first", [True, False])
async def test_reserve_two_requests_of_a_batch_compete_for_one_stored_book(
    redis: Redis, keys: Keys, scripts: Scripts, older_first: bool
) -> None:
    # The request that comes first in the call gets the book, whatever the entry ids.
    older = await pending_entry(redis, keys.lend_requests)
    newer = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.storage, "s1", "s2")
    winner, loser = (older, newer) if older_first else (newer, older)

    codes = await reserve(redis, scripts, keys, (winner, 0, ["s1"]), (loser, 0, ["s1", "s2"]))

    assert codes == ["1", "21"]
    assert await members(redis, keys.reservation(winner)) == {"s1"}
    assert await members(redis, keys.reservation(loser)) == {"s2"}
    assert not await redis.exists(keys.storage)


@pytest.mark.parametrize(("retry", "codes"), [(1, "1120"), (0, "2120")])
async def test_reserve_retry_flag_looks_in_the_reservation(
    redis: Redis, keys: Keys, scripts: Scripts, retry: int, codes: str
) -> None:
    # r1 was reserved by an earlier delivery; only the retry flag makes the script look.
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "r1")
    await redis.sadd(keys.storage, "s1")
    await redis.hset(keys.lent_books, "l1", "bob")

    assert await reserve(redis, scripts, keys, (entry, retry, ["r1", "s1", "x", "l1"])) == [codes]

    assert await members(redis, keys.reservation(entry)) == {"r1", "s1"}
    assert not await redis.exists(keys.storage)


async def test_reserve_is_idempotent(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.storage, "s1", "s2", "other")
    await redis.hset(keys.lent_books, "l1", "bob")
    request = (entry, 1, ["s1", "s2", "x", "l1"])

    assert await reserve(redis, scripts, keys, request) == ["1120"]
    assert await reserve(redis, scripts, keys, request) == ["1120"]

    assert await members(redis, keys.reservation(entry)) == {"s1", "s2"}
    assert await members(redis, keys.storage) == {"other"}
    assert await hash_of(redis, keys.lent_books) == {"l1": "bob"}


@pytest.mark.parametrize("how", ["acknowledged", "taken_over", "never_delivered"])
async def test_reserve_takes_nothing_for_an_entry_not_pending_on_this_consumer(
    redis: Redis, keys: Keys, scripts: Scripts, how: str
) -> None:
    mine = await pending_entry(redis, keys.lend_requests)
    if how == "acknowledged":
        other = await finished_entry(redis, keys.lend_requests)
    elif how == "taken_over":
        other = await pending_entry(redis, keys.lend_requests, consumer="c2")
        await redis.sadd(keys.reservation(other), "r1")  # what c2 reserved
    else:
        other = await undelivered_entry(redis, keys.lend_requests)
    await redis.sadd(keys.storage, "s1")

    # Asked first, with the retry flag: still nothing for the entry that is not ours.
    codes = await reserve(redis, scripts, keys, (other, 1, ["s1", "r1"]), (mine, 0, ["s1"]))

    assert codes == ["", "1"]
    assert await members(redis, keys.reservation(mine)) == {"s1"}
    expected_other = {"r1"} if how == "taken_over" else set()
    assert await members(redis, keys.reservation(other)) == expected_other
    assert not await redis.exists(keys.storage)


async def test_reserve_leaves_storage_alone_when_no_request_is_mine(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    other = await pending_entry(redis, keys.lend_requests, consumer="c2")
    await redis.sadd(keys.storage, "s1")

    assert await reserve(redis, scripts, keys, (other, 0, ["s1"])) == [""]

    assert await members(redis, keys.storage) == {"s1"}
    assert not await redis.exists(keys.reservation(other))
    assert await pending_on(redis, keys.lend_requests, other) == "c2"


# -- the reads -----------------------------------------------------------------------------


async def test_reserve_reads_counts_and_holders(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.set(keys.user_count("ada"), 3)
    await redis.set(keys.user_count("cy"), 1)
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "b1": "bob"})

    counts, holders = await peek(redis, scripts, keys, ["ada", "bob", "cy"], ["b1", "never", "a1"])

    assert counts == ["3", "", "1"]
    assert holders == ["bob", "", "ada"]
    # Reading changes nothing.
    assert not await redis.exists(keys.user_count("bob"))
    assert await hash_of(redis, keys.lent_books) == {"a1": "ada", "b1": "bob"}


@pytest.mark.parametrize(
    ("users", "books", "expected"),
    [
        ([], [], [[], []]),
        (["ada"], [], [["2"], []]),
        ([], ["a1"], [[], ["ada"]]),
    ],
)
async def test_reserve_with_nothing_to_read_on_one_side(
    redis: Redis, keys: Keys, scripts: Scripts, users: list[str], books: list[str], expected: list[list[str]]
) -> None:
    await redis.set(keys.user_count("ada"), 2)
    await redis.hset(keys.lent_books, "a1", "ada")

    assert await peek(redis, scripts, keys, users, books) == expected


async def test_reserve_reserves_and_reads_in_one_call(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.storage, "s1")
    await redis.set(keys.user_count("ada"), 2)
    await redis.hset(keys.lent_books, "r1", "ada")
    call_keys, args = reserve_call(keys, [(entry, 0, ["s1", "x"])])

    codes, counts, holders = await scripts.reserve(redis, [*call_keys, keys.user_count("ada")], [*args, "r1", "s1"])

    assert [decoded(c) for c in codes] == ["12"]
    assert [decoded(c) for c in counts] == ["2"]
    assert [decoded(h) for h in holders] == ["ada", ""]
    assert await members(redis, keys.reservation(entry)) == {"s1"}
