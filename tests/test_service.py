"""The lending service through a running worker: every branch of the spec's Behaviour."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
from redis.asyncio import Redis

from lending.domain.events import Event
from lending.domain.policy import NOTHING_AVAILABLE
from lending.errors import ConfigError
from lending.keys import LENDING_GROUP, SHELVING_GROUP, Keys
from lending.redis.consumer import Delivery, ensure_group
from lending.redis.scripts import Scripts
from lending.service.lending import LendingService
from lending.service.shelving import Grant
from lending.service.shelving_mock import ShelvingService
from lending.settings import MAX_BOOKS_PER_REQUEST, Settings

from .conftest import StartWorker
from .support import (
    all_events,
    decoded,
    event_for,
    hash_of,
    members,
    process_one,
    raw_entries,
    raw_streams,
    send,
    send_raw,
    stream_entries,
    wait_until,
    xadd_fields,
)

# -- reading the state -------------------------------------------------------------------


async def lent_books(redis: Redis, keys: Keys) -> dict[str, str]:
    return await hash_of(redis, keys.lent_books)


async def storage(redis: Redis, keys: Keys) -> set[str]:
    return await members(redis, keys.storage)


async def shelving_state(redis: Redis, keys: Keys) -> dict[str, str]:
    return await hash_of(redis, keys.shelving_state)


async def count(redis: Redis, keys: Keys, user: str) -> int | None:
    value = await redis.get(keys.user_count(user))
    return None if value is None else int(value)


async def reservations(redis: Redis, keys: Keys) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=keys.pattern("reservations:*"), count=1000)]


async def pending(redis: Redis, stream: str, group: str = LENDING_GROUP) -> int:
    if not await redis.exists(stream):
        return 0
    return int((await redis.xpending(stream, group))["pending"])


async def shelving_caught_up(redis: Redis, keys: Keys) -> bool:
    """Has the shelving consumer applied every entry of ``shelving:returns``?"""
    if not await redis.exists(keys.shelving_returns):
        return True
    groups = {decoded(g["name"]): g for g in await redis.xinfo_groups(keys.shelving_returns)}
    if SHELVING_GROUP not in groups:
        return False
    last = raw_entries(await redis.xrevrange(keys.shelving_returns, count=1))
    group = groups[SHELVING_GROUP]
    if not last:  # created empty by the group's MKSTREAM
        return bool(group["pending"] == 0)
    return bool(decoded(group["last-delivered-id"]) == last[0][0] and group["pending"] == 0)


async def returned_to_shelving(redis: Redis, keys: Keys) -> list[str]:
    """Every book handed back on ``shelving:returns``, processed or not."""
    entries = await stream_entries(redis, keys.shelving_returns)
    return [book for _, fields in entries for book in fields["book_ids"].split(",")]


async def lend(redis: Redis, keys: Keys, user: str, *books: str) -> Event:
    return await event_for(redis, keys, "lend", await send(redis, keys, "lend", user, books))


async def give_back(redis: Redis, keys: Keys, user: str, *books: str) -> Event:
    return await event_for(redis, keys, "return", await send(redis, keys, "return", user, books))


async def assert_consistent(redis: Redis, keys: Keys) -> None:
    """What must hold between requests, whatever happened before."""
    lent = await lent_books(redis, keys)
    stored = await storage(redis, keys)
    assert not set(lent) & stored, "a book is both lent and in storage"
    for user in set(lent.values()):
        assert await count(redis, keys, user) == sum(1 for u in lent.values() if u == user)
    assert await reservations(redis, keys) == []
    assert await pending(redis, keys.lend_requests) == 0
    assert await pending(redis, keys.return_requests) == 0


# -- lend: accepted --------------------------------------------------------------------------


async def test_lend_from_shelving(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    entry = await send(redis, keys, "lend", "ada", ["b1", "b2"])

    event = await event_for(redis, keys, "lend", entry)

    assert event == Event(entry, "lend", "ada", "accepted", ("b1", "b2"), (), "")
    assert await lent_books(redis, keys) == {"b1": "ada", "b2": "ada"}
    assert await count(redis, keys, "ada") == 2
    assert await shelving_state(redis, keys) == {"b1": entry, "b2": entry}
    assert await storage(redis, keys) == set()
    await assert_consistent(redis, keys)


async def test_lend_from_storage_after_a_return_filled_it(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    first = await send(redis, keys, "lend", "ada", ["b1"])
    assert (await event_for(redis, keys, "lend", first)).status == "accepted"
    assert (await give_back(redis, keys, "ada", "b1")).status == "returned"
    assert await storage(redis, keys) == {"b1"}

    event = await lend(redis, keys, "bob", "b1")

    assert (event.status, event.books) == ("accepted", ("b1",))
    assert await storage(redis, keys) == set()  # moved out, not copied
    assert await lent_books(redis, keys) == {"b1": "bob"}
    # Taken from storage: the shelving service was not asked again.
    assert await shelving_state(redis, keys) == {"b1": first}
    await assert_consistent(redis, keys)


async def test_books_from_storage_and_shelving_in_request_order(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker()
    await lend(redis, keys, "ada", "s1")
    await give_back(redis, keys, "ada", "s1")

    event = await lend(redis, keys, "bob", "n1", "s1", "n2")

    assert (event.status, event.books, event.skipped) == ("accepted", ("n1", "s1", "n2"), ())
    assert await count(redis, keys, "bob") == 3
    assert await storage(redis, keys) == set()


# -- lend: skipped, denied -------------------------------------------------------------------


async def test_books_lent_to_anyone_are_skipped(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    await lend(redis, keys, "ada", "b1")

    own = await lend(redis, keys, "ada", "b1", "b2")
    other = await lend(redis, keys, "bob", "b3", "b1")

    assert (own.status, own.books, own.skipped, own.reason) == ("accepted", ("b2",), ("b1",), "")
    assert (other.status, other.books, other.skipped) == ("accepted", ("b3",), ("b1",))
    assert await lent_books(redis, keys) == {"b1": "ada", "b2": "ada", "b3": "bob"}
    assert await count(redis, keys, "ada") == 2
    assert await count(redis, keys, "bob") == 1
    await assert_consistent(redis, keys)


async def test_denied_when_none_of_the_books_is_available(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    await lend(redis, keys, "ada", "b1", "b2")

    for user in ("bob", "ada"):
        entry = await send(redis, keys, "lend", user, ["b2", "b1"])
        event = await event_for(redis, keys, "lend", entry)
        assert event == Event(entry, "lend", user, "denied", (), ("b2", "b1"), NOTHING_AVAILABLE)

    assert await lent_books(redis, keys) == {"b1": "ada", "b2": "ada"}
    assert await count(redis, keys, "bob") is None
    assert await count(redis, keys, "ada") == 2
    await assert_consistent(redis, keys)


async def test_a_book_the_shelving_service_handed_to_another_request_is_skipped(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker()
    await redis.hset(keys.shelving_state, "b1", "some-other-request")

    event = await lend(redis, keys, "ada", "b1", "b2")

    assert (event.status, event.books, event.skipped) == ("accepted", ("b2",), ("b1",))
    assert (await shelving_state(redis, keys))["b1"] == "some-other-request"


async def test_over_the_limit_denied_with_the_numbers(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    await lend(redis, keys, "ada", "h1", "h2", "h3", "h4")
    await lend(redis, keys, "bob", "taken")

    entry = await send(redis, keys, "lend", "ada", ["n1", "taken", "n2"])
    event = await event_for(redis, keys, "lend", entry)

    assert event.status == "denied"
    assert event.books == ()
    assert event.skipped == ("n1", "taken", "n2")  # all requested books
    assert event.reason == "user holds 4 books; 2 more would exceed the limit of 5 per user"
    assert await count(redis, keys, "ada") == 4
    assert await lent_books(redis, keys) == {"h1": "ada", "h2": "ada", "h3": "ada", "h4": "ada", "taken": "bob"}
    # The reservation went back to storage, which had room.
    assert await storage(redis, keys) == {"n1", "n2"}
    await assert_consistent(redis, keys)


async def test_at_the_limit_is_accepted(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker(max_books_per_user=3)
    await lend(redis, keys, "ada", "h1")
    event = await lend(redis, keys, "ada", "n1", "n2")
    assert (event.status, event.books) == ("accepted", ("n1", "n2"))
    assert await count(redis, keys, "ada") == 3
    denied = await lend(redis, keys, "ada", "n3")
    assert denied.status == "denied"
    assert denied.reason == "user holds 3 books; 1 more would exceed the limit of 3 per user"


async def test_over_the_limit_compensation_fills_storage_then_hands_the_rest_to_shelving(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker(storage_capacity=2)
    requested = [f"n{i}" for i in range(1, 7)]

    entry = await send(redis, keys, "lend", "ada", requested)
    event = await event_for(redis, keys, "lend", entry)

    assert (event.status, event.books, event.skipped) == ("denied", (), tuple(requested))
    assert event.reason == "user holds 0 books; 6 more would exceed the limit of 5 per user"
    stored = await storage(redis, keys)
    assert len(stored) == 2 and stored <= set(requested)
    handed_back = await returned_to_shelving(redis, keys)
    assert sorted(handed_back) == sorted(set(requested) - stored)
    assert await redis.xlen(keys.shelving_returns) == 1
    # The shelving consumer takes its books back; the ones in storage stay "handed out".
    await wait_until(lambda: shelving_caught_up(redis, keys))
    assert await shelving_state(redis, keys) == dict.fromkeys(stored, entry)
    assert await count(redis, keys, "ada") is None
    assert await lent_books(redis, keys) == {}
    await assert_consistent(redis, keys)


# -- return ----------------------------------------------------------------------------------


async def test_return_takes_back_only_the_users_books(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    await lend(redis, keys, "ada", "a1", "a2", "a3")
    await lend(redis, keys, "bob", "b1")

    entry = await send(redis, keys, "return", "ada", ["a1", "b1", "nowhere", "a3"])
    event = await event_for(redis, keys, "return", entry)

    assert event == Event(entry, "return", "ada", "returned", ("a1", "a3"), ("b1", "nowhere"), "")
    assert await lent_books(redis, keys) == {"a2": "ada", "b1": "bob"}
    assert await count(redis, keys, "ada") == 1
    assert await count(redis, keys, "bob") == 1
    assert await storage(redis, keys) == {"a1", "a3"}
    await assert_consistent(redis, keys)


async def test_returning_everything_deletes_the_count(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    await lend(redis, keys, "ada", "a1", "a2")
    event = await give_back(redis, keys, "ada", "a2", "a1")
    assert (event.status, event.books) == ("returned", ("a2", "a1"))
    assert not await redis.exists(keys.user_count("ada"))
    assert await lent_books(redis, keys) == {}


async def test_return_refills_storage_up_to_capacity_and_the_rest_goes_to_shelving(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker(storage_capacity=2)
    first = await send(redis, keys, "lend", "ada", ["a1", "a2", "a3", "a4"])
    await event_for(redis, keys, "lend", first)
    await lend(redis, keys, "bob", "b1")

    event = await give_back(redis, keys, "ada", "a1", "a2", "a3", "a4", "b1")

    assert (event.status, event.books, event.skipped) == ("returned", ("a1", "a2", "a3", "a4"), ("b1",))
    stored = await storage(redis, keys)
    assert len(stored) == 2 and stored <= {"a1", "a2", "a3", "a4"}
    assert sorted(await returned_to_shelving(redis, keys)) == sorted({"a1", "a2", "a3", "a4"} - stored)
    await wait_until(lambda: shelving_caught_up(redis, keys))
    state = await shelving_state(redis, keys)
    assert set(state) == stored | {"b1"}, "books back on the shelves are no longer handed out"
    assert await count(redis, keys, "ada") is None
    await assert_consistent(redis, keys)


async def test_return_to_a_full_storage_goes_to_shelving(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker(storage_capacity=1)
    await lend(redis, keys, "ada", "a1", "a2")
    await give_back(redis, keys, "ada", "a1")
    await give_back(redis, keys, "ada", "a2")
    assert await storage(redis, keys) == {"a1"}
    assert await returned_to_shelving(redis, keys) == ["a2"]
    await wait_until(lambda: shelving_caught_up(redis, keys))
    assert set(await shelving_state(redis, keys)) == {"a1"}


async def test_return_denied_when_none_is_lent_to_the_user(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    await lend(redis, keys, "bob", "b1")

    entry = await send(redis, keys, "return", "ada", ["b1", "never-lent"])
    event = await event_for(redis, keys, "return", entry)

    assert event == Event(
        entry, "return", "ada", "denied", (), ("b1", "never-lent"), "none of the requested books is lent to ada"
    )
    assert await lent_books(redis, keys) == {"b1": "bob"}
    assert await count(redis, keys, "bob") == 1
    assert not await redis.exists(keys.user_count("ada"))
    assert await storage(redis, keys) == set()
    await assert_consistent(redis, keys)


async def test_a_returned_book_can_be_lent_again(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    await lend(redis, keys, "ada", "b1")
    await give_back(redis, keys, "ada", "b1")
    assert (await give_back(redis, keys, "ada", "b1")).status == "denied"  # not twice
    assert (await lend(redis, keys, "ada", "b1")).status == "accepted"
    assert await count(redis, keys, "ada") == 1


# -- rejected entries --------------------------------------------------------------------------

MALFORMED: list[tuple[Mapping[bytes | str, bytes | str], str, str]] = [
    # (fields, user_id in the event, a word of the reason)
    ({"book_ids": "b1"}, "", "user_id"),
    ({"user_id": "ada"}, "ada", "book_ids"),
    ({"something": "else"}, "", "user_id"),
    ({"user_id": b"\xffada", "book_ids": "b1"}, "", "UTF-8"),
    ({"user_id": "ada", "book_ids": b"b1,\xc3"}, "ada", "UTF-8"),
    ({"user_id": "", "book_ids": "b1"}, "", "empty"),
    ({"user_id": "ada", "book_ids": ""}, "ada", "empty"),
    ({"user_id": "ada", "book_ids": "b1,,b2"}, "ada", "empty"),
    ({"user_id": "ada", "book_ids": "b1,"}, "ada", "empty"),
    ({"user_id": "a da", "book_ids": "b1"}, "a da", "U+0020"),
    ({"user_id": "ada", "book_ids": "b1,b\u00a02"}, "ada", "U+00A0"),
    ({"user_id": "ada", "book_ids": "b\u200b1"}, "ada", "U+200B"),
    ({"user_id": "ada", "book_ids": "b1\x00"}, "ada", "U+0000"),
    ({"user_id": "x" * 129, "book_ids": "b1"}, "", "129"),
    ({"user_id": "ada", "book_ids": "y" * 129}, "ada", "129"),
    ({"user_id": "ada", "book_ids": ",".join(f"b{i}" for i in range(51))}, "ada", "51"),
]


async def test_malformed_entries_are_rejected_acknowledged_and_touch_nothing(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker()
    sent: list[tuple[str, str, str, str]] = []
    for action in ("lend", "return"):
        for fields, user, word in MALFORMED:
            sent.append((action, await send_raw(redis, keys, action, fields), user, word))

    for action, entry, user, word in sent:
        event = await event_for(redis, keys, action, entry)
        assert (event.request_id, event.action, event.status) == (entry, action, "rejected")
        assert event.user_id == user
        assert word in event.reason, (word, event.reason)
        assert (event.books, event.skipped) == ((), ())

    assert await pending(redis, keys.lend_requests) == 0
    assert await pending(redis, keys.return_requests) == 0
    assert len(await all_events(redis, keys)) == len(sent)
    touched = {key.decode() async for key in redis.scan_iter(match=keys.pattern("*"), count=1000)}
    allowed = {
        keys.lend_requests,
        keys.return_requests,
        keys.events,
        keys.shelving_returns,
        keys.worker("w1"),
        keys.worker_info("w1"),
        keys.workers,
        keys.config,
    }  # the worker's own
    assert touched <= allowed, touched - allowed
    assert await redis.xlen(keys.shelving_returns) == 0


async def test_rejected_entries_do_not_disturb_valid_ones(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    bad = await send_raw(redis, keys, "lend", {"user_id": "ada", "book_ids": "b1,b 2"})
    good = await send(redis, keys, "lend", "ada", ["b1"])
    assert (await event_for(redis, keys, "lend", bad)).status == "rejected"
    assert (await event_for(redis, keys, "lend", good)).books == ("b1",)
    assert await lent_books(redis, keys) == {"b1": "ada"}


# -- duplicates and the per-request maximum ----------------------------------------------------


async def test_duplicates_in_a_request_count_once(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    event = await lend(redis, keys, "ada", "d1", "d1", "d2", "d1", "d2")
    assert (event.status, event.books, event.skipped) == ("accepted", ("d1", "d2"), ())
    assert await count(redis, keys, "ada") == 2

    back = await give_back(redis, keys, "ada", "d2", "d2", "d2")
    assert (back.status, back.books, back.skipped) == ("returned", ("d2",), ())
    assert await count(redis, keys, "ada") == 1


async def test_duplicates_do_not_count_against_the_user_limit(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker(max_books_per_user=2)
    event = await lend(redis, keys, "ada", *(["d1", "d2"] * 10))
    assert (event.status, event.books) == ("accepted", ("d1", "d2"))


async def test_max_books_per_request(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker(max_books_per_request=3, max_books_per_user=10)

    at_max = await lend(redis, keys, "ada", "m1", "m2", "m1", "m3", "m2")
    assert (at_max.status, at_max.books) == ("accepted", ("m1", "m2", "m3"))

    over = await lend(redis, keys, "ada", "o1", "o2", "o3", "o4")
    assert over.status == "rejected"
    assert "4" in over.reason and "3" in over.reason
    over_return = await give_back(redis, keys, "ada", "m1", "m2", "m3", "o1")
    assert over_return.status == "rejected"

    assert await lent_books(redis, keys) == dict.fromkeys(["m1", "m2", "m3"], "ada")
    assert await count(redis, keys, "ada") == 3


async def test_a_request_of_the_most_books_allowed_is_answered(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    """The greatest --max-books-per-request (1,000): every script takes a request that
    big (past some thousands, Lua's unpack refused, and the entry was never answered);
    a greater one is refused at start."""
    most = MAX_BOOKS_PER_REQUEST
    await start_worker(max_books_per_request=most, max_books_per_user=most, storage_capacity=most)
    books = [f"big-{n}" for n in range(most)]

    lent = await lend(redis, keys, "ada", *books)
    assert (lent.status, len(lent.books)) == ("accepted", most)
    returned = await give_back(redis, keys, "ada", *books)
    assert (returned.status, len(returned.books)) == ("returned", most)
    with pytest.raises(ConfigError, match="at most 1000"):
        Settings(max_books_per_request=most + 1)


async def test_a_ten_thousand_book_request_is_rejected_with_the_count(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await start_worker()
    event = await lend(redis, keys, "ada", *(f"book-{i}" for i in range(10_000)))
    assert event.status == "rejected"
    assert "10000" in event.reason and "50" in event.reason
    assert await shelving_state(redis, keys) == {}


# -- one event per request, nothing left behind -------------------------------------------------


async def test_every_request_gets_exactly_one_event(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker(storage_capacity=3, max_books_per_user=3)
    users = ["ada", "bob", "cy"]
    async with redis.pipeline(transaction=False) as pipe:
        plan: list[tuple[str, dict[str, str]]] = []
        for i in range(60):
            user = users[i % 3]
            books = [f"b{(i * 7 + k) % 12}" for k in range(1 + i % 4)]
            action = "return" if i % 5 == 4 else "lend"
            plan.append((action, {"user_id": user, "book_ids": ",".join(books)}))
        plan.append(("lend", {"user_id": "bad user", "book_ids": "b1"}))
        plan.append(("return", {"book_ids": "b1"}))
        for action, fields in plan:
            pipe.xadd(keys.requests(action), xadd_fields(fields))
        ids = await pipe.execute()
    sent = [(action, decoded(entry)) for (action, _), entry in zip(plan, ids, strict=True)]

    events = [await event_for(redis, keys, action, entry) for action, entry in sent]
    await asyncio.sleep(0.3)  # a duplicate would come right after

    assert {e.status for e in events} <= {"accepted", "denied", "returned", "rejected"}
    per_request = Counter((e.action, e.request_id) for e in await all_events(redis, keys))
    assert per_request == Counter(sent)
    assert await reservations(redis, keys) == []
    for user in users:
        assert (await count(redis, keys, user) or 0) <= 3
    await assert_consistent(redis, keys)
    await wait_until(lambda: shelving_caught_up(redis, keys))
    lent = await lent_books(redis, keys)
    assert set(await shelving_state(redis, keys)) == set(lent) | await storage(redis, keys)


async def test_worker_survives_200_malformed_entries_then_processes_a_valid_one(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    worker = await start_worker()
    kinds: list[Mapping[bytes | str, bytes | str]] = [
        {"junk": "x"},
        {"user_id": b"\xff\xfe", "book_ids": b"\xff"},
        {"user_id": "ada", "book_ids": ","},
        {"user_id": "ada", "book_ids": "\x00"},
        {"user_id": "z" * 5000, "book_ids": "z" * 5000},
        {"user_id": "ada", "book_ids": ",".join(str(i) for i in range(500))},
        {"book_ids": "b1"},
        {"user_id": "ada\n", "book_ids": "b1"},
    ]
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(200):
            pipe.xadd(keys.requests("lend" if i % 2 else "return"), xadd_fields(kinds[i % len(kinds)]))
        await pipe.execute()

    entry = await send(redis, keys, "lend", "ada", ["b1"])
    event = await event_for(redis, keys, "lend", entry, timeout_s=20)

    assert (event.status, event.books) == ("accepted", ("b1",))
    await wait_until(lambda: _count_events(redis, keys, 201))
    statuses = Counter(e.status for e in await all_events(redis, keys))
    assert statuses == Counter({"rejected": 200, "accepted": 1})
    assert all(c.failures == 0 for c in worker.consumers)
    assert await pending(redis, keys.lend_requests) == 0
    assert await pending(redis, keys.return_requests) == 0


async def _count_events(redis: Redis, keys: Keys, expected: int) -> bool:
    return int(await redis.xlen(keys.events)) >= expected


# -- a worker that resumes after another finished its entry -------------------------------------


class PausedAfterShelving(ShelvingService):
    """The shelving mock, but the caller stalls after the service has answered."""

    def __init__(self, client: Redis, keys: Keys, scripts: Scripts) -> None:
        super().__init__(client, keys, scripts)
        self.answered = asyncio.Event()
        self.resume = asyncio.Event()

    async def get_many(self, asks: Sequence[tuple[str, str]]) -> list[Grant]:
        grants = await super().get_many(asks)
        self.answered.set()
        await self.resume.wait()
        return grants


async def test_a_stalled_worker_does_not_give_back_books_the_other_worker_lent(
    redis: Redis, keys: Keys, settings: Settings, start_worker: StartWorker
) -> None:
    """Worker A is handed the book by shelving, then stalls past ``claim_idle_ms``;
    the live worker takes the entry over (shelving answers "already yours") and lends
    the book. When A resumes, it must not hand that lent book back to shelving."""
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    entry = await send(redis, keys, "lend", "ada", ["b1"])
    reply = raw_streams(await redis.xreadgroup(LENDING_GROUP, "A", {keys.lend_requests: ">"}, count=1))
    ((_, ((_, fields),)),) = reply
    scripts = Scripts()
    stalled_shelving = PausedAfterShelving(redis, keys, scripts)
    stalled = LendingService(redis, settings.replace(worker_id="A"), scripts, stalled_shelving)
    task = asyncio.create_task(process_one(stalled, Delivery(keys.lend_requests, entry, fields, 1)))
    await stalled_shelving.answered.wait()
    assert await shelving_state(redis, keys) == {"b1": entry}

    await start_worker()  # takes the entry over once idle for claim_idle_ms
    event = await event_for(redis, keys, "lend", entry)
    assert (event.status, event.books) == ("accepted", ("b1",))

    stalled_shelving.resume.set()
    assert await task is None  # A noticed the entry was finished
    await wait_until(lambda: shelving_caught_up(redis, keys))

    assert await lent_books(redis, keys) == {"b1": "ada"}
    assert "b1" not in await returned_to_shelving(redis, keys), "a lent book was handed back to shelving"
    assert await shelving_state(redis, keys) == {"b1": entry}
    assert len(await all_events(redis, keys)) == 1
