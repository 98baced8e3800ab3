"""Every script of ``lua/``, called directly with literal keys, checked on Redis state."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from lending.keys import LENDING_GROUP, SHELVING_GROUP, Keys
from lending.scripts import Scripts
from lending.stream import ensure_group

EVENT_FIELDS = ["request_id", "action", "user_id", "status", "books", "skipped", "reason"]


@pytest.fixture
def scripts() -> Scripts:
    return Scripts()


# -- helpers ---------------------------------------------------------------------------


def text(value: bytes | str | None) -> str:
    """A reply of the bytes-in, bytes-out client as text."""
    assert value is not None
    return value.decode() if isinstance(value, bytes) else value


async def pending_entry(redis: Redis, stream: str, group: str = LENDING_GROUP, **fields: str) -> str:
    """Add an entry to ``stream`` and deliver it to a consumer: it is now pending."""
    await ensure_group(redis, stream, group)
    entry = text(await redis.xadd(stream, dict(fields or {"user_id": "ada", "book_ids": "b1"})))  # type: ignore[arg-type]
    reply: Any = await redis.xreadgroup(group, "c1", {stream: ">"}, count=1)
    assert text(reply[0][1][0][0]) == entry
    return entry


async def finished_entry(redis: Redis, stream: str, group: str = LENDING_GROUP) -> str:
    """An entry delivered and acknowledged: finished by someone else."""
    entry = await pending_entry(redis, stream, group)
    assert await redis.xack(stream, group, entry) == 1
    return entry


async def is_pending(redis: Redis, stream: str, entry: str, group: str = LENDING_GROUP) -> bool:
    return bool(await redis.xpending_range(stream, group, min=entry, max=entry, count=1))


async def members(redis: Redis, key: str) -> set[str]:
    return {text(m) for m in await redis.smembers(key)}


async def hash_of(redis: Redis, key: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in (await redis.hgetall(key)).items()}


async def stream_items(redis: Redis, stream: str) -> list[list[tuple[str, str]]]:
    """Entries as ordered (field, value) lists, to check field order too."""
    entries: Any = await redis.xrange(stream)
    return [[(text(k), text(v)) for k, v in fields.items()] for _, fields in entries]


async def stream_fields(redis: Redis, stream: str) -> list[dict[str, str]]:
    return [dict(items) for items in await stream_items(redis, stream)]


def returned_books(entries: list[dict[str, str]]) -> list[str]:
    return [book for entry in entries for book in entry["book_ids"].split(",")]


# -- reserve.lua ---------------------------------------------------------------------------


def reserve_keys(keys: Keys, entry: str) -> list[str]:
    return [keys.lend_requests, keys.lent_books, keys.storage, keys.reservation(entry)]


async def test_reserve_codes_per_book(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.lent_books, mapping={"lent": "bob", "mine": "ada"})
    await redis.sadd(keys.storage, "stored1", "stored2", "other")

    codes = await scripts.reserve(
        redis, reserve_keys(keys, entry), [LENDING_GROUP, entry, "lent", "stored1", "nowhere", "mine", "stored2"]
    )

    assert codes == [0, 1, 2, 0, 1]
    assert await members(redis, keys.reservation(entry)) == {"stored1", "stored2"}
    assert await members(redis, keys.storage) == {"other"}  # SMOVEd, not copied
    assert await hash_of(redis, keys.lent_books) == {"lent": "bob", "mine": "ada"}


async def test_reserve_is_idempotent(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.storage, "s1", "s2")
    args = [LENDING_GROUP, entry, "s1", "s2", "x"]

    assert await scripts.reserve(redis, reserve_keys(keys, entry), args) == [1, 1, 2]
    await redis.sadd(keys.storage, "s3")
    assert await scripts.reserve(redis, reserve_keys(keys, entry), args) == [1, 1, 2]

    assert await members(redis, keys.reservation(entry)) == {"s1", "s2"}
    assert await members(redis, keys.storage) == {"s3"}


async def test_reserve_takes_nothing_once_the_entry_is_acknowledged(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.sadd(keys.storage, "s1")

    assert await scripts.reserve(redis, reserve_keys(keys, entry), [LENDING_GROUP, entry, "s1", "x"]) == -1

    assert await members(redis, keys.storage) == {"s1"}
    assert not await redis.exists(keys.reservation(entry))


async def test_reserve_takes_nothing_for_an_entry_never_delivered(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    entry = text(await redis.xadd(keys.lend_requests, {"user_id": "ada", "book_ids": "s1"}))
    await redis.sadd(keys.storage, "s1")

    assert await scripts.reserve(redis, reserve_keys(keys, entry), [LENDING_GROUP, entry, "s1"]) == -1
    assert await members(redis, keys.storage) == {"s1"}


# -- record_grants.lua ---------------------------------------------------------------------


def grants_keys(keys: Keys, entry: str) -> list[str]:
    return [keys.lend_requests, keys.reservation(entry), keys.shelving_returns, keys.from_shelving]


async def test_record_grants_adds_new_and_held_books_while_pending(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "from-storage")

    result = await scripts.record_grants(redis, grants_keys(keys, entry), [LENDING_GROUP, entry, 2, "n1", "n2", "h1"])

    assert result == 1
    assert await members(redis, keys.reservation(entry)) == {"from-storage", "n1", "n2", "h1"}
    # The library records the context it took each shelving book under.
    assert await hash_of(redis, keys.from_shelving) == {"n1": entry, "n2": entry, "h1": entry}
    assert await redis.xlen(keys.shelving_returns) == 0
    assert await is_pending(redis, keys.lend_requests, entry)


async def test_record_grants_with_nothing_to_record(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    assert await scripts.record_grants(redis, grants_keys(keys, entry), [LENDING_GROUP, entry, 0]) == 1
    assert not await redis.exists(keys.reservation(entry))


async def test_record_grants_after_the_entry_was_finished_gives_new_books_back(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await finished_entry(redis, keys.lend_requests)

    result = await scripts.record_grants(redis, grants_keys(keys, entry), [LENDING_GROUP, entry, 2, "n1", "n2", "h1", "h2"])

    assert result == 0
    assert not await redis.exists(keys.reservation(entry))
    # Only the newly handed-out books go back, as one entry; held ones are left alone.
    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "n1,n2", "context_ids": f"{entry},{entry}"}]
    assert not await redis.exists(keys.from_shelving)


async def test_record_grants_after_finish_keeps_a_new_book_the_finishing_worker_took(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # The stalled caller got n1 first ("new"); the worker that finished the request got
    # it as "already held" and lent it. It must not go back to shelving.
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.hset(keys.from_shelving, mapping={"n1": entry})
    await redis.hset(keys.lent_books, "n1", "ada")

    result = await scripts.record_grants(redis, grants_keys(keys, entry), [LENDING_GROUP, entry, 2, "n1", "n2"])

    assert result == 0
    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "n2", "context_ids": entry}]
    assert await hash_of(redis, keys.from_shelving) == {"n1": entry}


async def test_record_grants_after_finish_with_only_held_books_writes_nothing(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    assert await scripts.record_grants(redis, grants_keys(keys, entry), [LENDING_GROUP, entry, 0, "h1"]) == 0
    assert await redis.xlen(keys.shelving_returns) == 0
    assert not await redis.exists(keys.reservation(entry))


# -- lend.lua --------------------------------------------------------------------------------


def lend_keys(keys: Keys, entry: str, user: str = "ada") -> list[str]:
    return [keys.lend_requests, keys.events, keys.lent_books, keys.user_count(user), keys.reservation(entry)]


async def test_lend_commits_the_reservation(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.set(keys.user_count("ada"), 2)
    await redis.hset(keys.lent_books, mapping={"old1": "ada", "other": "bob"})
    await redis.sadd(keys.reservation(entry), "b2", "b1")

    result = await scripts.lend(redis, lend_keys(keys, entry), [LENDING_GROUP, entry, "ada", "x,y", "b2", "b1"])

    assert result == 1
    assert await redis.get(keys.user_count("ada")) == b"4"
    assert await hash_of(redis, keys.lent_books) == {"old1": "ada", "other": "bob", "b1": "ada", "b2": "ada"}
    assert not await redis.exists(keys.reservation(entry))
    assert not await is_pending(redis, keys.lend_requests, entry)
    assert await stream_items(redis, keys.events) == [
        [
            ("request_id", entry),
            ("action", "lend"),
            ("user_id", "ada"),
            ("status", "accepted"),
            ("books", "b2,b1"),  # the caller's (request) order
            ("skipped", "x,y"),
            ("reason", ""),
        ]
    ]


async def test_lend_creates_a_missing_count(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "b1")
    assert await scripts.lend(redis, lend_keys(keys, entry), [LENDING_GROUP, entry, "ada", "", "b1"]) == 1
    assert await redis.get(keys.user_count("ada")) == b"1"
    assert (await stream_fields(redis, keys.events))[0]["skipped"] == ""


@pytest.mark.parametrize(
    ("reservation", "decided"),
    [
        ({"b1", "b2"}, ["b1"]),  # another worker added to it
        ({"b1"}, ["b1", "b2"]),
        ({"b1", "b3"}, ["b1", "b2"]),  # same size, other books
        (set(), ["b1"]),  # emptied
    ],
)
async def test_lend_refuses_when_the_reservation_differs(
    redis: Redis, keys: Keys, scripts: Scripts, reservation: set[str], decided: list[str]
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    if reservation:
        await redis.sadd(keys.reservation(entry), *reservation)

    result = await scripts.lend(redis, lend_keys(keys, entry), [LENDING_GROUP, entry, "ada", "", *decided])

    assert result == -1
    assert await is_pending(redis, keys.lend_requests, entry)
    assert await members(redis, keys.reservation(entry)) == reservation
    assert not await redis.exists(keys.user_count("ada"), keys.lent_books, keys.events)


async def test_lend_writes_nothing_once_the_entry_is_acknowledged(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "b1")

    assert await scripts.lend(redis, lend_keys(keys, entry), [LENDING_GROUP, entry, "ada", "", "b1"]) == 0

    assert not await redis.exists(keys.user_count("ada"), keys.lent_books, keys.events)
    assert await members(redis, keys.reservation(entry)) == {"b1"}


# -- finish.lua ------------------------------------------------------------------------------


def finish_keys(keys: Keys, stream: str, entry: str) -> list[str]:
    return [stream, keys.events, keys.storage, keys.reservation(entry), keys.shelving_returns, keys.dead_letters, keys.from_shelving]


def event_args(entry: str, status: str = "denied", reason: str = "because") -> list[str]:
    values = [entry, "lend", "ada", status, "", "b1,b2", reason]
    return [str(len(EVENT_FIELDS))] + [item for pair in zip(EVENT_FIELDS, values) for item in pair]


async def test_finish_refills_storage_up_to_capacity_and_sends_the_rest_to_shelving(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.storage, "already")
    reserved = {"r1", "r2", "r3", "r4", "r5"}
    await redis.sadd(keys.reservation(entry), *reserved)

    result = await scripts.finish(
        redis, finish_keys(keys, keys.lend_requests, entry), [LENDING_GROUP, entry, 3, 1, *event_args(entry)]
    )

    assert result == 1
    storage = await members(redis, keys.storage)
    assert "already" in storage and len(storage) == 3
    returns = await stream_fields(redis, keys.shelving_returns)
    assert len(returns) == 1, "the rest goes back as one entry"
    back = returned_books(returns)
    assert len(back) == 3
    assert set(back) | (storage - {"already"}) == reserved
    assert not set(back) & storage
    assert not await redis.exists(keys.reservation(entry))
    assert not await is_pending(redis, keys.lend_requests, entry)


@pytest.mark.parametrize(
    ("capacity", "in_storage", "to_storage", "to_shelving"),
    [
        (20, 0, 3, 0),  # all fit: no returns entry
        (3, 0, 3, 0),  # exactly fit
        (0, 0, 0, 3),  # no storage at all
        (2, 2, 0, 3),  # storage full
        (1, 4, 0, 3),  # storage over capacity (capacity lowered since)
    ],
)
async def test_finish_give_back_split(
    redis: Redis, keys: Keys, scripts: Scripts, capacity: int, in_storage: int, to_storage: int, to_shelving: int
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    stored = {f"s{i}" for i in range(in_storage)}
    if stored:
        await redis.sadd(keys.storage, *stored)
    await redis.sadd(keys.reservation(entry), "r1", "r2", "r3")

    await scripts.finish(
        redis, finish_keys(keys, keys.lend_requests, entry), [LENDING_GROUP, entry, capacity, 1, *event_args(entry)]
    )

    assert len(await members(redis, keys.storage) - stored) == to_storage
    returns = await stream_fields(redis, keys.shelving_returns)
    assert len(returned_books(returns)) == to_shelving
    assert len(returns) == (1 if to_shelving else 0)
    assert not await redis.exists(keys.reservation(entry))


async def test_finish_writes_the_event_in_order(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)

    await scripts.finish(
        redis,
        finish_keys(keys, keys.lend_requests, entry),
        [LENDING_GROUP, entry, 20, 1, *event_args(entry, "denied", "none of the requested books is available")],
    )

    assert await stream_items(redis, keys.events) == [
        [
            ("request_id", entry),
            ("action", "lend"),
            ("user_id", "ada"),
            ("status", "denied"),
            ("books", ""),
            ("skipped", "b1,b2"),
            ("reason", "none of the requested books is available"),
        ]
    ]
    assert await redis.xlen(keys.dead_letters) == 0
    assert await redis.xlen(keys.shelving_returns) == 0


async def test_finish_leaves_the_reservation_alone_when_told_to(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    # Return entries are numbered apart from lend entries: the same id may be a lend's.
    entry = await pending_entry(redis, keys.return_requests)
    await redis.sadd(keys.reservation(entry), "lend-book")

    result = await scripts.finish(
        redis, finish_keys(keys, keys.return_requests, entry), [LENDING_GROUP, entry, 20, 0, *event_args(entry)]
    )

    assert result == 1
    assert await members(redis, keys.reservation(entry)) == {"lend-book"}
    assert not await redis.exists(keys.storage, keys.shelving_returns)
    assert not await is_pending(redis, keys.return_requests, entry)
    assert await redis.xlen(keys.events) == 1


async def test_finish_writes_a_dead_letter_after_the_event(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)

    await scripts.finish(
        redis,
        finish_keys(keys, keys.lend_requests, entry),
        [LENDING_GROUP, entry, 20, 1, *event_args(entry, "failed", "boom"), "error", "boom", "deliveries", "5"],
    )

    assert await stream_items(redis, keys.dead_letters) == [[("error", "boom"), ("deliveries", "5")]]
    events = await stream_fields(redis, keys.events)
    assert [e["status"] for e in events] == ["failed"]


async def test_finish_without_event_only_acks_and_dead_letters(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.shelving_returns, SHELVING_GROUP, book_ids="b1")

    result = await scripts.finish(
        redis,
        [keys.shelving_returns, keys.events, keys.storage, keys.reservation(entry), keys.shelving_returns, keys.dead_letters, keys.from_shelving],
        [SHELVING_GROUP, entry, 20, 0, 0, "error", "bad"],
    )

    assert result == 1
    assert not await redis.exists(keys.events)
    assert await stream_fields(redis, keys.dead_letters) == [{"error": "bad"}]
    assert not await is_pending(redis, keys.shelving_returns, entry, SHELVING_GROUP)


async def test_finish_writes_nothing_once_the_entry_is_acknowledged(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "r1")

    result = await scripts.finish(
        redis,
        finish_keys(keys, keys.lend_requests, entry),
        [LENDING_GROUP, entry, 20, 1, *event_args(entry), "error", "boom"],
    )

    assert result == 0
    assert await members(redis, keys.reservation(entry)) == {"r1"}
    assert not await redis.exists(keys.storage, keys.shelving_returns, keys.events, keys.dead_letters)


# -- return.lua ------------------------------------------------------------------------------


def return_keys(keys: Keys, user: str = "ada") -> list[str]:
    return [
        keys.return_requests, keys.events, keys.lent_books, keys.user_count(user), keys.storage,
        keys.shelving_returns, keys.from_shelving,
    ]


NOTHING = "none of the requested books is lent to ada"


async def test_return_takes_back_only_the_users_books(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "a2": "ada", "a3": "ada", "b1": "bob"})
    await redis.set(keys.user_count("ada"), 3)
    await redis.set(keys.user_count("bob"), 1)

    result = await scripts.return_books(
        redis, return_keys(keys), [LENDING_GROUP, entry, "ada", 20, NOTHING, "a2", "b1", "never", "a1"]
    )

    assert result == [b"returned", b"a2,a1", b"b1,never"]
    assert await hash_of(redis, keys.lent_books) == {"a3": "ada", "b1": "bob"}
    assert await redis.get(keys.user_count("ada")) == b"1"
    assert await redis.get(keys.user_count("bob")) == b"1"
    assert await members(redis, keys.storage) == {"a1", "a2"}
    assert not await redis.exists(keys.shelving_returns)
    assert not await is_pending(redis, keys.return_requests, entry)
    assert await stream_items(redis, keys.events) == [
        [
            ("request_id", entry),
            ("action", "return"),
            ("user_id", "ada"),
            ("status", "returned"),
            ("books", "a2,a1"),
            ("skipped", "b1,never"),
            ("reason", ""),
        ]
    ]


async def test_return_deletes_a_count_that_reaches_zero(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "a2": "ada"})
    await redis.set(keys.user_count("ada"), 2)

    await scripts.return_books(redis, return_keys(keys), [LENDING_GROUP, entry, "ada", 20, NOTHING, "a1", "a2"])

    assert not await redis.exists(keys.user_count("ada"))
    assert not await redis.exists(keys.lent_books)


async def test_return_refills_storage_up_to_capacity_then_shelving(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    books = ["a1", "a2", "a3", "a4"]
    await redis.hset(keys.lent_books, mapping=dict.fromkeys(books, "ada"))
    await redis.set(keys.user_count("ada"), 4)
    await redis.sadd(keys.storage, "s1")
    await redis.hset(keys.from_shelving, mapping={"a1": "r1", "a2": "r2", "a3": "r3", "a4": "r4", "s1": "r0"})

    await scripts.return_books(redis, return_keys(keys), [LENDING_GROUP, entry, "ada", 2, NOTHING, *books])

    # Storage filled in request order up to its capacity; the rest as one entry, with
    # the context each book was handed out to, and out of the library's record.
    assert await members(redis, keys.storage) == {"s1", "a1"}
    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "a2,a3,a4", "context_ids": "r2,r3,r4"}]
    assert await hash_of(redis, keys.from_shelving) == {"a1": "r1", "s1": "r0"}


async def test_return_with_storage_full(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada"})
    await redis.set(keys.user_count("ada"), 1)
    await redis.sadd(keys.storage, "s1", "s2")

    await scripts.return_books(redis, return_keys(keys), [LENDING_GROUP, entry, "ada", 2, NOTHING, "a1"])

    assert await members(redis, keys.storage) == {"s1", "s2"}
    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "a1", "context_ids": ""}]


async def test_return_denied_when_none_is_lent_to_the_user(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"b1": "bob"})
    await redis.set(keys.user_count("ada"), 3)  # whatever it says, nothing changes

    result = await scripts.return_books(redis, return_keys(keys), [LENDING_GROUP, entry, "ada", 20, NOTHING, "b1", "x"])

    assert result == [b"denied", b"", b"b1,x"]
    assert await hash_of(redis, keys.lent_books) == {"b1": "bob"}
    assert await redis.get(keys.user_count("ada")) == b"3"
    assert not await redis.exists(keys.storage, keys.shelving_returns)
    assert not await is_pending(redis, keys.return_requests, entry)
    events = await stream_fields(redis, keys.events)
    assert events == [
        {
            "request_id": entry,
            "action": "return",
            "user_id": "ada",
            "status": "denied",
            "books": "",
            "skipped": "b1,x",
            "reason": NOTHING,
        }
    ]


async def test_return_writes_nothing_once_the_entry_is_acknowledged(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await finished_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada"})
    await redis.set(keys.user_count("ada"), 1)

    assert await scripts.return_books(redis, return_keys(keys), [LENDING_GROUP, entry, "ada", 20, NOTHING, "a1"]) == 0

    assert await hash_of(redis, keys.lent_books) == {"a1": "ada"}
    assert await redis.get(keys.user_count("ada")) == b"1"
    assert not await redis.exists(keys.storage, keys.shelving_returns, keys.events)


# -- shelving_get.lua / shelving_release.lua ---------------------------------------------------


async def test_shelving_get_hands_out_idempotently_per_context(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    state = [keys.shelving_state]
    assert await scripts.shelving_get(redis, state, ["r1", "b1", "b2"]) == [1, 1]
    assert await scripts.shelving_get(redis, state, ["r1", "b1", "b3"]) == [2, 1]
    assert await scripts.shelving_get(redis, state, ["r2", "b1", "b2", "b3", "b4"]) == [0, 0, 0, 1]
    assert await hash_of(redis, keys.shelving_state) == {"b1": "r1", "b2": "r1", "b3": "r1", "b4": "r2"}


async def test_shelving_release_acks_and_frees_books_once(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.hset(keys.shelving_state, mapping={"b1": "r1", "b2": "r1", "kept": "r1"})
    entry = await pending_entry(redis, keys.shelving_returns, SHELVING_GROUP, book_ids="b1,b2")
    release_keys = [keys.shelving_returns, keys.shelving_state]

    assert await scripts.shelving_release(redis, release_keys, [SHELVING_GROUP, entry, 2, "b1", "b2"]) == 1
    assert await hash_of(redis, keys.shelving_state) == {"kept": "r1"}
    assert not await is_pending(redis, keys.shelving_returns, entry, SHELVING_GROUP)

    # b1 handed out again since: a late second release must not free it.
    await redis.hset(keys.shelving_state, "b1", "r9")
    assert await scripts.shelving_release(redis, release_keys, [SHELVING_GROUP, entry, 2, "b1", "b2"]) == 0
    assert await hash_of(redis, keys.shelving_state) == {"kept": "r1", "b1": "r9"}


async def test_shelving_release_frees_a_book_only_for_the_context_it_comes_back_from(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # b1 was handed back twice for r1 and handed out to r9 in between: keep r9's.
    await redis.hset(keys.shelving_state, mapping={"b1": "r9", "b2": "r1"})
    entry = await pending_entry(redis, keys.shelving_returns, SHELVING_GROUP, book_ids="b1,b2")
    release_keys = [keys.shelving_returns, keys.shelving_state]
    assert await scripts.shelving_release(redis, release_keys, [SHELVING_GROUP, entry, 2, "b1", "b2", "r1", "r1"]) == 1
    assert await hash_of(redis, keys.shelving_state) == {"b1": "r9"}


async def test_shelving_release_of_an_entry_without_books(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.hset(keys.shelving_state, "b1", "r1")
    entry = await pending_entry(redis, keys.shelving_returns, SHELVING_GROUP, book_ids="")
    assert await scripts.shelving_release(redis, [keys.shelving_returns, keys.shelving_state], [SHELVING_GROUP, entry, 0]) == 1
    assert await hash_of(redis, keys.shelving_state) == {"b1": "r1"}


# -- worker_claim.lua / worker_release.lua -----------------------------------------------------


async def test_worker_claim_and_renew(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    key = keys.worker("w1")
    assert await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0]) == 1
    assert await redis.get(key) == b"token-a"
    assert 0 < await redis.pttl(key) <= 10_000

    # Renewing with the same token extends the TTL.
    await redis.pexpire(key, 500)
    assert await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0]) == 1
    assert await redis.pttl(key) > 5_000


async def test_worker_claim_refuses_another_token_unless_forced(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    key = keys.worker("w1")
    await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0])

    assert await scripts.worker_claim(redis, [key], ["token-b", 10_000, 0]) == 0
    assert await redis.get(key) == b"token-a"

    assert await scripts.worker_claim(redis, [key], ["token-b", 10_000, 1]) == 1
    assert await redis.get(key) == b"token-b"
    assert await redis.pttl(key) > 0
    # The old holder's next renewal now fails: it has lost the id.
    assert await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0]) == 0


async def test_worker_id_is_free_again_after_the_ttl(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    key = keys.worker("w1")
    await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0])
    await redis.delete(key)  # as if the TTL had passed
    assert await scripts.worker_claim(redis, [key], ["token-b", 10_000, 0]) == 1


async def test_worker_release_only_by_the_holder(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    key = keys.worker("w1")
    await scripts.worker_claim(redis, [key], ["token-a", 10_000, 0])

    assert await scripts.worker_release(redis, [key], ["token-b"]) == 0
    assert await redis.get(key) == b"token-a"

    assert await scripts.worker_release(redis, [key], ["token-a"]) == 1
    assert not await redis.exists(key)
    assert await scripts.worker_release(redis, [key], ["token-a"]) == 0


# -- loading -----------------------------------------------------------------------------------


async def test_every_lua_file_is_registered(scripts: Scripts) -> None:
    from lending.scripts import _lua_dir  # noqa: PLC0415

    on_disk = {p.name.removesuffix(".lua") for p in _lua_dir().iterdir() if p.name.endswith(".lua")}
    assert {script.name for script in scripts.all()} == on_disk


async def test_scripts_run_again_after_script_flush(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await scripts.load(redis)
    await redis.script_flush()
    assert await scripts.shelving_get(redis, [keys.shelving_state], ["r1", "b1"]) == [1]
