"""commit.lua: apply a batch's decided records (built by ``lending.commit``).

Every call here is encoded by ``encode_commit``, the one encoder of the script's wire
format, from the typed records the service builds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ResponseError

from lending.domain.commit import Lend, Record, Reject, Return, encode_commit
from lending.domain.events import ACCEPTED, DENIED, REJECTED, RETURNED, Event
from lending.keys import LEND, LENDING_GROUP, RETURN, Keys
from lending.redis.scripts import Scripts
from lending.settings import Limits

from ..support import all_events, hash_of, members
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
    pending_on,
    script_commands,
    server_major,
    snapshot,
    stream_fields,
    stream_items,
    undelivered_entry,
)

LIMIT = "ada may not borrow more than 3 books"
NOTHING = "none of the requested books is lent to ada"


def rejected(action: str, entry: str, user: str = "ada", reason: str = "bad request") -> Reject:
    return Reject(Event(entry, action, user, REJECTED, reason=reason))


def accepted(
    entry: str,
    user: str = "ada",
    *,
    stored: Sequence[str] = (),
    granted: Sequence[str] = (),
    skipped: Sequence[str] = (),
) -> Lend:
    """An accepted lend: it lends ``stored`` then ``granted`` (the event's books)."""
    event = Event(entry, LEND, user, ACCEPTED, (*stored, *granted), tuple(skipped))
    return Lend(event, tuple(stored), tuple(granted))


def denied(
    entry: str,
    user: str = "ada",
    *,
    stored: Sequence[str] = (),
    granted: Sequence[str] = (),
    skipped: Sequence[str] = (),
    reason: str = LIMIT,
) -> Lend:
    """A denied lend: it gives back ``stored`` and ``granted``."""
    return Lend(Event(entry, LEND, user, DENIED, (), tuple(skipped), reason), tuple(stored), tuple(granted))


def returned(entry: str, user: str = "ada", *, books: Sequence[str], skipped: Sequence[str] = ()) -> Return:
    return Return(Event(entry, RETURN, user, RETURNED, tuple(books), tuple(skipped)))


def return_denied(entry: str, user: str = "ada", *, skipped: Sequence[str], reason: str = NOTHING) -> Return:
    return Return(Event(entry, RETURN, user, DENIED, (), tuple(skipped), reason))


async def publish(redis: Redis, keys: Keys, capacity: int = 20) -> None:
    """{NS}:config as the worker deciding under ``capacity`` published it at its start
    (written only if it differs: under OOM it cannot be)."""
    fields = Limits(storage_capacity=capacity).fields()
    if await hash_of(redis, keys.config) != fields:
        await redis.delete(keys.config)
        for name, value in fields.items():
            await redis.hset(keys.config, name, value)


async def commit(
    redis: Redis,
    scripts: Scripts,
    keys: Keys,
    *records: Record,
    consumer: str = "c1",
    capacity: int = 20,
    published: bool = False,
    counts: dict[str, int] | None = None,
) -> Any:
    """Run commit.lua for ``records`` as the consumer would, its limits published first
    (unless the test ``published`` {NS}:config itself); decided under ``counts`` (each
    user's count as read), when given."""
    if not published:
        await publish(redis, keys, capacity)
    limits = Limits(storage_capacity=capacity)
    call_keys, args = encode_commit(keys, LENDING_GROUP, consumer, limits, records, counts)
    return await scripts.commit(redis, call_keys, args)


# -- lends ---------------------------------------------------------------------------------


async def test_commit_accepted_lend_from_storage(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.set(keys.user_count("ada"), 2)
    await redis.hset(keys.lent_books, mapping={"old1": "ada", "other": "bob"})
    await redis.sadd(keys.reservation(entry), "b2", "b1")

    result = await commit(redis, scripts, keys, accepted(entry, stored=["b2", "b1"], skipped=["x", "y"]))

    assert result == [1]
    assert await redis.get(keys.user_count("ada")) == b"4"
    assert await hash_of(redis, keys.lent_books) == {"old1": "ada", "other": "bob", "b1": "ada", "b2": "ada"}
    assert not await redis.exists(keys.reservation(entry))
    assert not await is_pending(redis, keys.lend_requests, entry)
    assert not await redis.exists(keys.storage, keys.shelving_returns, keys.from_shelving, keys.grants)
    # The event as the caller decided it, in the contract's field order.
    assert await stream_items(redis, keys.events) == [
        [
            ("request_id", entry),
            ("action", "lend"),
            ("user_id", "ada"),
            ("status", "accepted"),
            ("books", "b2,b1"),
            ("skipped", "x,y"),
            ("reason", ""),
        ]
    ]


async def test_commit_lend_creates_a_missing_count(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "b1")

    assert await commit(redis, scripts, keys, accepted(entry, stored=["b1"])) == [1]

    assert await redis.get(keys.user_count("ada")) == b"1"
    assert (await stream_fields(redis, keys.events))[0]["skipped"] == ""


async def test_commit_accepted_lend_with_shelving_grants(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.set(keys.user_count("ada"), 1)
    await redis.sadd(keys.reservation(entry), "s1")
    # s1 came to storage from shelving earlier, under another context: that record stays.
    await redis.hset(keys.from_shelving, "s1", "r0")
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})
    record = accepted(entry, stored=["s1"], granted=["g1", "g2"])

    assert await commit(redis, scripts, keys, record) == [1]

    assert await redis.get(keys.user_count("ada")) == b"4"
    assert await hash_of(redis, keys.lent_books) == {"s1": "ada", "g1": "ada", "g2": "ada"}
    # The library now holds the grants, under the request they were handed to.
    assert await hash_of(redis, keys.from_shelving) == {"s1": "r0", "g1": entry, "g2": entry}
    assert not await redis.exists(keys.grants, keys.reservation(entry), keys.shelving_returns, keys.storage)
    assert await all_events(redis, keys) == [record.event]


async def test_commit_accepted_lend_of_grants_only(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})

    assert await commit(redis, scripts, keys, accepted(entry, granted=["g1", "g2"])) == [1]

    assert await redis.get(keys.user_count("ada")) == b"2"
    assert await hash_of(redis, keys.lent_books) == {"g1": "ada", "g2": "ada"}
    assert await hash_of(redis, keys.from_shelving) == {"g1": entry, "g2": entry}
    assert not await redis.exists(keys.grants)
    assert not await is_pending(redis, keys.lend_requests, entry)


async def test_commit_settles_only_the_ledger_entries_that_name_the_request(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # g2's ledger entry names another request now (settled and handed out anew); g3 has
    # none; "other" belongs to another request. Only g1's entry is this request's.
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": "r-new", "other": "r9"})

    result, commands = await monitored(
        redis, keys, lambda: commit(redis, scripts, keys, accepted(entry, granted=["g1", "g2", "g3"]))
    )

    assert result == [1]
    assert await hash_of(redis, keys.grants) == {"g2": "r-new", "other": "r9"}
    assert [c.text for c in script_commands(commands) if c.name == "HDEL"] == [f"HDEL {keys.grants} g1"]
    # Lent all the same: the decision was the caller's.
    assert await hash_of(redis, keys.lent_books) == {"g1": "ada", "g2": "ada", "g3": "ada"}


@pytest.mark.parametrize(
    ("reservation", "stored"),
    [
        ({"b1", "b2"}, ["b1"]),  # another worker added to it
        ({"b1"}, ["b1", "b2"]),
        ({"b1", "b3"}, ["b1", "b2"]),  # same size, other books
        (set(), ["b1"]),  # emptied
        ({"n1"}, []),  # nothing from storage was decided on, but the reservation holds a book
    ],
)
@pytest.mark.parametrize("status", [ACCEPTED, DENIED])
async def test_commit_refuses_when_a_reservation_differs(
    redis: Redis, keys: Keys, scripts: Scripts, reservation: set[str], stored: list[str], status: str
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    if reservation:
        await redis.sadd(keys.reservation(entry), *reservation)
    await redis.hset(keys.grants, "g1", entry)
    make = accepted if status == ACCEPTED else denied
    record = make(entry, stored=stored, granted=["g1"])
    await publish(redis, keys, 0)
    before = await snapshot(redis, keys)

    assert await commit(redis, scripts, keys, record, capacity=0) == -1

    await assert_unchanged(redis, keys, before)
    assert await is_pending(redis, keys.lend_requests, entry)


@pytest.mark.parametrize("now", [None, 3, 5])
async def test_commit_refuses_when_a_count_changed_since_it_was_read(
    redis: Redis, keys: Keys, scripts: Scripts, now: int | None
) -> None:
    """WATCH guards the counts; the script checks them as well, for a commit Redis runs
    without its MULTI (refused: an ACL changed under a running worker)."""
    entry = await pending_entry(redis, keys.lend_requests)
    other = await pending_entry(redis, keys.return_requests)
    await redis.sadd(keys.reservation(entry), "b1")
    await redis.hset(keys.lent_books, "r1", "bob")
    await redis.set(keys.user_count("bob"), 1)
    if now is not None:
        await redis.set(keys.user_count("ada"), now)  # read as 4: changed since
    await publish(redis, keys, 20)
    before = await snapshot(redis, keys)
    records: list[Record] = [accepted(entry, stored=["b1"]), returned(other, "bob", books=["r1"])]

    assert await commit(redis, scripts, keys, *records, published=True, counts={"ada": 4, "bob": 1}) == -1

    await assert_unchanged(redis, keys, before)
    assert await is_pending(redis, keys.lend_requests, entry)


async def test_commit_goes_through_when_the_counts_are_the_ones_read(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "b1")
    await redis.set(keys.user_count("ada"), 4)

    # A user without a count reads as 0, as the service reads one.
    assert await commit(redis, scripts, keys, accepted(entry, stored=["b1"]), counts={"ada": 4, "bob": 0}) == [1]
    assert await redis.get(keys.user_count("ada")) == b"5"


async def test_commit_minus_one_leaves_everything_untouched(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    rejected_lend = await pending_entry(redis, keys.lend_requests)
    accepted_lend = await pending_entry(redis, keys.lend_requests)
    denied_lend = await pending_entry(redis, keys.lend_requests)
    elsewhere = await pending_entry(redis, keys.lend_requests, consumer="c2")
    changed = await pending_entry(redis, keys.lend_requests)
    returned_entry = await pending_entry(redis, keys.return_requests)
    await redis.set(keys.user_count("ada"), 1)
    await redis.hset(keys.lent_books, "a1", "ada")
    await redis.hset(keys.from_shelving, mapping={"a1": "r0", "d1": "r1"})
    await redis.hset(keys.grants, mapping={"g1": accepted_lend, "g2": elsewhere, "g3": denied_lend})
    await redis.sadd(keys.reservation(accepted_lend), "s1")
    await redis.sadd(keys.reservation(denied_lend), "d1")
    await redis.sadd(keys.reservation(changed), "s2", "x9")  # x9 added since the decision
    await redis.sadd(keys.storage, "other")
    records: list[Record] = [
        rejected(LEND, rejected_lend),
        accepted(accepted_lend, stored=["s1"], granted=["g1"]),
        returned(returned_entry, books=["a1"]),
        denied(denied_lend, "bob", stored=["d1"], granted=["g3"]),
        accepted(elsewhere, "cy", granted=["g2"]),
        accepted(changed, "dan", stored=["s2"]),  # the last record: checked before anything is written
    ]
    await publish(redis, keys, 1)
    before = await snapshot(redis, keys)

    assert await commit(redis, scripts, keys, *records, capacity=1) == -1

    await assert_unchanged(redis, keys, before)
    for entry in (rejected_lend, accepted_lend, denied_lend, changed):
        assert await pending_on(redis, keys.lend_requests, entry) == "c1"
    assert await pending_on(redis, keys.lend_requests, elsewhere) == "c2"
    assert await pending_on(redis, keys.return_requests, returned_entry) == "c1"


async def test_commit_checks_only_the_reservations_of_its_own_lends(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    # c2 works on the entry and its reservation has grown: not ours to check.
    elsewhere = await pending_entry(redis, keys.lend_requests, consumer="c2")
    mine = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(elsewhere), "s1", "n1")
    await redis.sadd(keys.reservation(mine), "s2")

    result = await commit(
        redis, scripts, keys, accepted(elsewhere, stored=["s1"]), accepted(mine, "bob", stored=["s2"])
    )

    assert result == [0, 1]
    assert await members(redis, keys.reservation(elsewhere)) == {"s1", "n1"}
    assert await pending_on(redis, keys.lend_requests, elsewhere) == "c2"
    assert await hash_of(redis, keys.lent_books) == {"s2": "bob"}


async def test_commit_writes_nothing_for_a_finished_lend(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "b1")

    assert await commit(redis, scripts, keys, accepted(entry, stored=["b1"])) == [0]

    assert not await redis.exists(keys.user_count("ada"), keys.lent_books, keys.events, keys.shelving_returns)
    assert not await redis.exists(keys.from_shelving, keys.storage)
    assert await members(redis, keys.reservation(entry)) == {"b1"}


async def test_commit_writes_nothing_for_a_lend_never_delivered(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await undelivered_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "b1")

    assert await commit(redis, scripts, keys, accepted(entry, stored=["b1"])) == [0]

    assert not await redis.exists(keys.user_count("ada"), keys.lent_books, keys.events)
    assert await members(redis, keys.reservation(entry)) == {"b1"}


# -- lends that are not mine: their grants stay in the ledger for reconcile.lua -----------


@pytest.mark.parametrize("how", ["taken_over", "acknowledged", "never_delivered"])
@pytest.mark.parametrize("status", [ACCEPTED, DENIED])
async def test_commit_not_mine_lend_writes_nothing_and_leaves_its_grants_in_the_ledger(
    redis: Redis, keys: Keys, scripts: Scripts, how: str, status: str
) -> None:
    if how == "taken_over":
        entry = await pending_entry(redis, keys.lend_requests, consumer="c2")
        await redis.sadd(keys.reservation(entry), "s1")  # what c2 reserved from storage
    elif how == "acknowledged":
        entry = await finished_entry(redis, keys.lend_requests)
    else:
        entry = await undelivered_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})
    # A denied record would give its books back: storage has no room, shelving would get them.
    make = accepted if status == ACCEPTED else denied
    await publish(redis, keys, 0)
    before = await snapshot(redis, keys)

    assert await commit(redis, scripts, keys, make(entry, granted=["g1", "g2"]), capacity=0) == [0]

    await assert_unchanged(redis, keys, before)
    assert await hash_of(redis, keys.grants) == {"g1": entry, "g2": entry}


async def test_commit_settles_its_own_lend_and_leaves_the_grants_of_one_not_mine(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    elsewhere = await pending_entry(redis, keys.lend_requests, consumer="c2")
    mine = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": elsewhere, "g2": mine})

    result = await commit(
        redis, scripts, keys, accepted(elsewhere, granted=["g1"]), accepted(mine, "bob", granted=["g2"])
    )

    assert result == [0, 1]
    assert await hash_of(redis, keys.grants) == {"g1": elsewhere}
    assert await hash_of(redis, keys.lent_books) == {"g2": "bob"}
    assert await hash_of(redis, keys.from_shelving) == {"g2": mine}
    assert not await redis.exists(keys.shelving_returns, keys.reservation(elsewhere), keys.user_count("ada"))


# -- denied lends --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "in_storage", "to_storage", "back", "contexts", "from_shelving"),
    [
        # All fit: grants going to storage are recorded under the request.
        (20, 0, ["s1", "s2", "g1", "g2"], "", "", {"s1": "r0", "g1": "{e}", "g2": "{e}"}),
        (4, 0, ["s1", "s2", "g1", "g2"], "", "", {"s1": "r0", "g1": "{e}", "g2": "{e}"}),  # exactly fit
        (3, 1, ["s1", "s2"], "g1,g2", "{e},{e}", {"s1": "r0"}),
        (4, 1, ["s1", "s2", "g1"], "g2", "{e}", {"s1": "r0", "g1": "{e}"}),
        # Storage full: storage books go back under the context on record ('' when none).
        (1, 1, [], "s1,s2,g1,g2", "r0,,{e},{e}", {}),
        (1, 3, [], "s1,s2,g1,g2", "r0,,{e},{e}", {}),  # over capacity (lowered since)
        (0, 0, [], "s1,s2,g1,g2", "r0,,{e},{e}", {}),  # no storage at all
    ],
)
async def test_commit_denied_lend_gives_back_storage_books_and_grants(
    redis: Redis,
    keys: Keys,
    scripts: Scripts,
    capacity: int,
    in_storage: int,
    to_storage: list[str],
    back: str,
    contexts: str,
    from_shelving: dict[str, str],
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    already = {f"f{i}" for i in range(in_storage)}
    if already:
        await redis.sadd(keys.storage, *already)
    await redis.sadd(keys.reservation(entry), "s1", "s2")
    await redis.hset(keys.from_shelving, "s1", "r0")
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry, "other": "r9"})
    await redis.set(keys.user_count("ada"), 3)
    record = denied(entry, stored=["s1", "s2"], granted=["g1", "g2"], skipped=["s1", "s2", "g1", "g2"])

    assert await commit(redis, scripts, keys, record, capacity=capacity) == [1]

    assert await members(redis, keys.storage) == already | set(to_storage)
    expected_back = [{"book_ids": back, "context_ids": contexts.format(e=entry)}] if back else []
    assert await stream_fields(redis, keys.shelving_returns) == expected_back
    assert await hash_of(redis, keys.from_shelving) == {b: c.format(e=entry) for b, c in from_shelving.items()}
    # Its grants are settled whichever way they went.
    assert await hash_of(redis, keys.grants) == {"other": "r9"}
    assert not await redis.exists(keys.reservation(entry), keys.lent_books)
    assert await redis.get(keys.user_count("ada")) == b"3"
    assert not await is_pending(redis, keys.lend_requests, entry)
    assert await all_events(redis, keys) == [record.event]


async def test_commit_denied_lend_with_nothing_reserved(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.storage, "other")
    record = denied(entry, skipped=["b1", "b2"], reason="none of the requested books is available")

    assert await commit(redis, scripts, keys, record) == [1]

    assert not await is_pending(redis, keys.lend_requests, entry)
    assert await all_events(redis, keys) == [record.event]
    assert await members(redis, keys.storage) == {"other"}
    assert not await redis.exists(keys.shelving_returns, keys.from_shelving, keys.lent_books, keys.user_count("ada"))


# -- returns -------------------------------------------------------------------------------


async def test_commit_return_takes_back_the_books(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "a2": "ada", "a3": "ada", "b1": "bob"})
    await redis.set(keys.user_count("ada"), 3)
    await redis.set(keys.user_count("bob"), 1)

    result = await commit(redis, scripts, keys, returned(entry, books=["a2", "a1"], skipped=["b1", "never"]))

    assert result == [1]
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


async def test_commit_return_deletes_a_count_that_reaches_zero(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "a2": "ada"})
    await redis.set(keys.user_count("ada"), 2)

    assert await commit(redis, scripts, keys, returned(entry, books=["a1", "a2"])) == [1]

    assert not await redis.exists(keys.user_count("ada"))
    assert not await redis.exists(keys.lent_books)


async def test_commit_return_refills_storage_up_to_capacity_then_shelving(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    books = ["a1", "a2", "a3", "a4"]
    await redis.hset(keys.lent_books, mapping=dict.fromkeys(books, "ada"))
    await redis.set(keys.user_count("ada"), 4)
    await redis.sadd(keys.storage, "s1")
    await redis.hset(keys.from_shelving, mapping={"a1": "r1", "a2": "r2", "a3": "r3", "a4": "r4", "s1": "r0"})

    assert await commit(redis, scripts, keys, returned(entry, books=books), capacity=2) == [1]

    # Storage filled in request order up to its capacity; the rest as one entry, with
    # the context each book was handed out to, and out of the library's record.
    assert await members(redis, keys.storage) == {"s1", "a1"}
    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "a2,a3,a4", "context_ids": "r2,r3,r4"}]
    assert await hash_of(redis, keys.from_shelving) == {"a1": "r1", "s1": "r0"}
    assert not await redis.exists(keys.lent_books, keys.user_count("ada"))


async def test_commit_return_with_storage_full(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "a2": "ada"})
    await redis.set(keys.user_count("ada"), 2)
    await redis.sadd(keys.storage, "s1", "s2")
    await redis.hset(keys.from_shelving, "a2", "r2")

    assert await commit(redis, scripts, keys, returned(entry, books=["a1", "a2"]), capacity=2) == [1]

    assert await members(redis, keys.storage) == {"s1", "s2"}
    # a1 has no record: no context, shelving frees it whoever holds it.
    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "a1,a2", "context_ids": ",r2"}]
    assert not await redis.exists(keys.from_shelving)


async def test_commit_return_denied_when_none_is_lent_to_the_user(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"b1": "bob"})
    await redis.set(keys.user_count("ada"), 3)  # whatever it says, nothing changes
    record = return_denied(entry, skipped=["b1", "x"])

    assert await commit(redis, scripts, keys, record) == [1]

    assert await hash_of(redis, keys.lent_books) == {"b1": "bob"}
    assert await redis.get(keys.user_count("ada")) == b"3"
    assert not await redis.exists(keys.storage, keys.shelving_returns)
    assert not await is_pending(redis, keys.return_requests, entry)
    assert await all_events(redis, keys) == [record.event]


async def test_commit_writes_nothing_for_a_finished_return(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await finished_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada"})
    await redis.set(keys.user_count("ada"), 1)

    assert await commit(redis, scripts, keys, returned(entry, books=["a1"])) == [0]

    assert await hash_of(redis, keys.lent_books) == {"a1": "ada"}
    assert await redis.get(keys.user_count("ada")) == b"1"
    assert not await redis.exists(keys.storage, keys.shelving_returns, keys.events)


# -- rejected entries ----------------------------------------------------------------------


async def test_commit_rejected_records_for_both_actions(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    lend = await pending_entry(redis, keys.lend_requests)
    ret = await pending_entry(redis, keys.return_requests)

    result = await commit(
        redis,
        scripts,
        keys,
        rejected(LEND, lend, "ada", "book_ids is empty"),
        rejected(RETURN, ret, "", "missing field user_id"),
    )

    assert result == [1, 1]
    assert not await is_pending(redis, keys.lend_requests, lend)
    assert not await is_pending(redis, keys.return_requests, ret)
    assert await stream_items(redis, keys.events) == [
        [
            ("request_id", lend),
            ("action", "lend"),
            ("user_id", "ada"),
            ("status", "rejected"),
            ("books", ""),
            ("skipped", ""),
            ("reason", "book_ids is empty"),
        ],
        [
            ("request_id", ret),
            ("action", "return"),
            ("user_id", ""),
            ("status", "rejected"),
            ("books", ""),
            ("skipped", ""),
            ("reason", "missing field user_id"),
        ],
    ]
    assert not await redis.exists(
        keys.lent_books,
        keys.storage,
        keys.shelving_returns,
        keys.from_shelving,
        keys.user_count("ada"),
        keys.reservation(lend),
    )


async def test_commit_writes_nothing_for_a_rejected_entry_not_mine(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    lend = await pending_entry(redis, keys.lend_requests, consumer="c2")
    ret = await finished_entry(redis, keys.return_requests)

    assert await commit(redis, scripts, keys, rejected(LEND, lend), rejected(RETURN, ret)) == [0, 0]

    assert await pending_on(redis, keys.lend_requests, lend) == "c2"
    assert not await redis.exists(keys.events)


# -- whole batches -------------------------------------------------------------------------


async def test_commit_mixed_batch_in_record_order(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    rejected_lend = await pending_entry(redis, keys.lend_requests)
    accepted_lend = await pending_entry(redis, keys.lend_requests)
    denied_lend = await pending_entry(redis, keys.lend_requests)
    returned_entry = await pending_entry(redis, keys.return_requests)
    rejected_return = await pending_entry(redis, keys.return_requests)
    await redis.sadd(keys.reservation(accepted_lend), "b1")
    await redis.sadd(keys.reservation(denied_lend), "b2")
    await redis.hset(keys.lent_books, "a1", "bob")
    await redis.set(keys.user_count("bob"), 1)
    await redis.set(keys.user_count("cy"), 3)
    # Records in an order of their own (not by stream, kind or entry id): events follow it.
    records: list[Record] = [
        rejected(RETURN, rejected_return, "dan", "book_ids is empty"),
        denied(denied_lend, "cy", stored=["b2"], skipped=["b2"]),
        returned(returned_entry, "bob", books=["a1"]),
        accepted(accepted_lend, "ada", stored=["b1"]),
        rejected(LEND, rejected_lend, "eve", "missing field user_id"),
    ]

    assert await commit(redis, scripts, keys, *records) == [1, 1, 1, 1, 1]

    assert await all_events(redis, keys) == [record.event for record in records]
    for entry in (rejected_lend, accepted_lend, denied_lend):
        assert not await is_pending(redis, keys.lend_requests, entry)
    for entry in (returned_entry, rejected_return):
        assert not await is_pending(redis, keys.return_requests, entry)
    assert await hash_of(redis, keys.lent_books) == {"b1": "ada"}
    assert await redis.get(keys.user_count("ada")) == b"1"
    assert not await redis.exists(keys.user_count("bob"))
    assert await redis.get(keys.user_count("cy")) == b"3"
    assert await members(redis, keys.storage) == {"a1", "b2"}
    assert not await redis.exists(keys.reservation(accepted_lend), keys.reservation(denied_lend), keys.shelving_returns)


async def test_commit_acks_only_entries_pending_on_this_consumer(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    mine_lend = await pending_entry(redis, keys.lend_requests)
    other_lend = await pending_entry(redis, keys.lend_requests, consumer="c2")
    done_lend = await finished_entry(redis, keys.lend_requests)
    mine_return = await pending_entry(redis, keys.return_requests)
    other_return = await pending_entry(redis, keys.return_requests, consumer="c2")
    await redis.sadd(keys.reservation(mine_lend), "b1")
    await redis.sadd(keys.reservation(other_lend), "b2")
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "a2": "bob"})
    await redis.set(keys.user_count("ada"), 1)
    await redis.set(keys.user_count("bob"), 1)

    result = await commit(
        redis,
        scripts,
        keys,
        accepted(mine_lend, "cy", stored=["b1"]),
        accepted(other_lend, "dan", stored=["b2"]),
        rejected(LEND, done_lend),
        returned(mine_return, "ada", books=["a1"]),
        returned(other_return, "bob", books=["a2"]),
    )

    assert result == [1, 0, 0, 1, 0]
    assert await pending_on(redis, keys.lend_requests, mine_lend) is None
    assert await pending_on(redis, keys.lend_requests, other_lend) == "c2"
    assert await pending_on(redis, keys.return_requests, mine_return) is None
    assert await pending_on(redis, keys.return_requests, other_return) == "c2"
    assert [e.request_id for e in await all_events(redis, keys)] == [mine_lend, mine_return]
    assert await hash_of(redis, keys.lent_books) == {"b1": "cy", "a2": "bob"}
    assert await members(redis, keys.reservation(other_lend)) == {"b2"}
    assert not await redis.exists(keys.user_count("dan"), keys.user_count("ada"))
    assert await redis.get(keys.user_count("bob")) == b"1"
    assert await redis.get(keys.user_count("cy")) == b"1"


async def test_commit_tells_the_two_streams_apart(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    # Return entries are numbered apart from lend entries: the same id in both streams
    # are two requests, each checked and acknowledged on its own stream.
    await pending_entry(redis, keys.lend_requests, consumer="c2", entry_id="5-1")
    await pending_entry(redis, keys.return_requests, entry_id="5-1")
    await pending_entry(redis, keys.lend_requests, entry_id="6-1")
    await pending_entry(redis, keys.return_requests, consumer="c2", entry_id="6-1")
    await pending_entry(redis, keys.lend_requests, consumer="c2", entry_id="7-1")
    await pending_entry(redis, keys.return_requests, entry_id="7-1")
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "a2": "ada"})
    await redis.set(keys.user_count("ada"), 2)

    result = await commit(
        redis,
        scripts,
        keys,
        rejected(RETURN, "5-1"),
        rejected(LEND, "6-1"),
        denied("5-1", "bob"),
        returned("6-1", books=["a2"]),
        returned("7-1", books=["a1"]),
    )

    assert result == [1, 1, 0, 0, 1]
    assert await hash_of(redis, keys.lent_books) == {"a2": "ada"}
    assert await redis.get(keys.user_count("ada")) == b"1"
    assert await pending_on(redis, keys.lend_requests, "5-1") == "c2"
    assert await pending_on(redis, keys.return_requests, "5-1") is None
    assert await pending_on(redis, keys.lend_requests, "6-1") is None
    assert await pending_on(redis, keys.return_requests, "6-1") == "c2"
    assert await pending_on(redis, keys.lend_requests, "7-1") == "c2"
    assert await pending_on(redis, keys.return_requests, "7-1") is None
    assert [(e.request_id, e.action) for e in await all_events(redis, keys)] == [
        ("5-1", "return"),
        ("6-1", "lend"),
        ("7-1", "return"),
    ]


async def test_commit_one_incrby_per_user_with_the_net_delta(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    ada_lend = await pending_entry(redis, keys.lend_requests)
    bob_lend1 = await pending_entry(redis, keys.lend_requests)
    bob_lend2 = await pending_entry(redis, keys.lend_requests)
    ada_return = await pending_entry(redis, keys.return_requests)
    cy_return = await pending_entry(redis, keys.return_requests)
    await redis.sadd(keys.reservation(ada_lend), "b1")
    await redis.sadd(keys.reservation(bob_lend1), "b2")
    await redis.hset(keys.grants, "n1", bob_lend2)
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "c1": "cy", "c2": "cy"})
    await redis.set(keys.user_count("ada"), 2)
    await redis.set(keys.user_count("cy"), 2)
    records: list[Record] = [
        accepted(ada_lend, "ada", stored=["b1"]),
        accepted(bob_lend1, "bob", stored=["b2"]),
        returned(ada_return, "ada", books=["a1"]),
        returned(cy_return, "cy", books=["c1", "c2"]),
        accepted(bob_lend2, "bob", granted=["n1"]),
    ]

    result, commands = await monitored(redis, keys, lambda: commit(redis, scripts, keys, *records))

    assert result == [1, 1, 1, 1, 1]
    # ada: +1 -1 = 0, nothing to write; bob: +1 +1 in one INCRBY; cy: -2, down to zero.
    assert sorted(c.text for c in script_commands(commands) if c.name == "INCRBY") == [
        f"INCRBY {keys.user_count('bob')} 2",
        f"INCRBY {keys.user_count('cy')} -2",
    ]
    assert await redis.get(keys.user_count("ada")) == b"2"
    assert await redis.get(keys.user_count("bob")) == b"2"
    assert not await redis.exists(keys.user_count("cy"))
    assert await hash_of(redis, keys.lent_books) == {"b1": "ada", "b2": "bob", "n1": "bob"}


async def test_commit_batch_shares_storage_room_and_one_returns_entry(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    returned_entry = await pending_entry(redis, keys.return_requests)
    denied_lend = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "a2": "ada"})
    await redis.set(keys.user_count("ada"), 2)
    await redis.sadd(keys.reservation(denied_lend), "s1")
    await redis.hset(keys.from_shelving, mapping={"a1": "r1", "a2": "r2", "s1": "r3"})
    await redis.hset(keys.grants, "g1", denied_lend)

    result = await commit(
        redis,
        scripts,
        keys,
        returned(returned_entry, books=["a1", "a2"]),
        denied(denied_lend, "bob", stored=["s1"], granted=["g1"], skipped=["s1", "g1"]),
        capacity=1,
    )

    assert result == [1, 1]
    # One room in storage, taken by the first book given back in record order.
    assert await members(redis, keys.storage) == {"a1"}
    assert await stream_fields(redis, keys.shelving_returns) == [
        {"book_ids": "a2,s1,g1", "context_ids": f"r2,r3,{denied_lend}"}
    ]
    assert await hash_of(redis, keys.from_shelving) == {"a1": "r1"}
    assert not await redis.exists(keys.grants)


# -- failure first: a call that fails changes nothing --------------------------------------


async def busy_batch(redis: Redis, keys: Keys) -> list[Record]:
    """A batch that writes everywhere when it commits: events, lent books, counts, storage,
    from-shelving, the ledger, reservations, acknowledgements of both streams, and (at
    capacity 1, storage full) an entry of ``{NS}:shelving:returns``."""
    lend = await pending_entry(redis, keys.lend_requests)
    deny = await pending_entry(redis, keys.lend_requests)
    reject = await pending_entry(redis, keys.lend_requests)
    ret = await pending_entry(redis, keys.return_requests)
    await redis.set(keys.user_count("ada"), 1)
    await redis.set(keys.user_count("cy"), 1)
    await redis.hset(keys.lent_books, mapping={"a0": "ada", "c1": "cy"})
    await redis.sadd(keys.storage, "f0")
    await redis.sadd(keys.reservation(lend), "s1")
    await redis.sadd(keys.reservation(deny), "s2")
    await redis.hset(keys.from_shelving, mapping={"s2": "r0", "c1": "r1"})
    await redis.hset(keys.grants, mapping={"g1": lend, "g2": deny, "other": "r9"})
    return [
        accepted(lend, "ada", stored=["s1"], granted=["g1"]),
        denied(deny, "bob", stored=["s2"], granted=["g2"], skipped=["s2", "g2"]),
        rejected(LEND, reject, "eve"),
        returned(ret, "cy", books=["c1"]),
    ]


async def test_commit_of_the_busy_batch_writes_everywhere(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    # The batch the failure tests below refuse: here it goes through, touching every key.
    records = await busy_batch(redis, keys)
    await publish(redis, keys, 1)
    before = await snapshot(redis, keys)

    assert await commit(redis, scripts, keys, *records, capacity=1) == [1, 1, 1, 1]

    after = await snapshot(redis, keys)
    for key in (
        keys.lent_books,
        keys.user_count("ada"),
        keys.from_shelving,
        keys.grants,
        keys.lend_requests,
        keys.return_requests,
    ):
        assert after[key] != before[key], key
    assert not await redis.exists(keys.user_count("cy"), keys.reservation(records[0].event.request_id))
    assert await redis.xlen(keys.events) == 4
    assert await redis.xlen(keys.shelving_returns) == 1


async def test_commit_reads_and_checks_everything_before_its_first_write_an_xadd(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    records = await busy_batch(redis, keys)

    result, commands = await monitored(redis, keys, lambda: commit(redis, scripts, keys, *records, capacity=1))

    assert result == [1, 1, 1, 1]
    assert_reads_then_writes(commands, f"XADD {keys.events}")


@pytest.mark.parametrize("full", ["events", "shelving_returns"])
async def test_commit_into_a_full_stream_changes_nothing(
    each_server: Redis, keys: Keys, scripts: Scripts, full: str
) -> None:
    redis = each_server
    records = await busy_batch(redis, keys)
    await fill_stream(redis, getattr(keys, full))
    await publish(redis, keys, 1)
    before = await snapshot(redis, keys)

    error, commands = await monitored_error(redis, keys, lambda: commit(redis, scripts, keys, *records, capacity=1))

    await assert_unchanged(redis, keys, before)
    assert not [c.text for c in script_commands(commands) if c.writes]
    # The reason, for the worker to tell a refusal by Redis from a failure of the entry.
    assert str(error).startswith("STREAMFULL"), str(error)


async def test_commit_with_shelving_returns_full_goes_through_when_nothing_goes_back(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    records = await busy_batch(redis, keys)
    await fill_stream(redis, keys.shelving_returns)

    # Room in storage for every book given back: the full stream is not needed.
    assert await commit(redis, scripts, keys, *records, capacity=20) == [1, 1, 1, 1]

    assert await redis.xlen(keys.shelving_returns) == 0
    assert await redis.xlen(keys.events) == 4


async def test_commit_with_a_count_that_is_not_an_integer_changes_nothing(
    each_server: Redis, keys: Keys, scripts: Scripts
) -> None:
    redis = each_server
    records = await busy_batch(redis, keys)
    await redis.set(keys.user_count("cy"), "lots")
    await publish(redis, keys, 1)
    before = await snapshot(redis, keys)

    with pytest.raises(ResponseError) as error:
        await commit(redis, scripts, keys, *records, capacity=1)

    await assert_unchanged(redis, keys, before)
    assert str(error.value).startswith("NOTINTEGER"), str(error.value)


@pytest.mark.parametrize("name", ["lent_books", "storage", "from_shelving", "grants", "events", "shelving_returns"])
async def test_commit_with_a_key_of_the_wrong_type_changes_nothing(
    each_server: Redis, keys: Keys, scripts: Scripts, name: str
) -> None:
    redis = each_server
    records = await busy_batch(redis, keys)
    key = getattr(keys, name)
    await redis.delete(key)
    await redis.rpush(key, "not", "a", "hash")
    await publish(redis, keys, 1)
    before = await snapshot(redis, keys)

    with pytest.raises(ResponseError) as error:
        await commit(redis, scripts, keys, *records, capacity=1)

    await assert_unchanged(redis, keys, before)
    assert "WRONGTYPE" in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("field", "theirs", "mine"),
    [("max_books_per_user", "2", "5"), ("storage_capacity", "0", "1"), ("max_books_per_request", "60", "50")],
)
async def test_commit_under_other_limits_than_the_namespaces_changes_nothing(
    redis: Redis, keys: Keys, scripts: Scripts, field: str, theirs: str, mine: str
) -> None:
    """A worker that stalled while the others were restarted with new limits decided under
    its old ones: none of it is written, and the reply names the limit."""
    records = await busy_batch(redis, keys)
    for name, value in {**Limits(storage_capacity=1).fields(), field: theirs}.items():
        await redis.hset(keys.config, name, value)
    before = await snapshot(redis, keys)

    result = await commit(redis, scripts, keys, *records, capacity=1, published=True)

    assert result == [-2, field.encode(), theirs.encode(), mine.encode()]
    await assert_unchanged(redis, keys, before)


CONFIG_NOT_HELD: dict[str, Callable[[Redis, Keys], Awaitable[object]]] = {
    "a field missing": lambda redis, keys: redis.hdel(keys.config, "max_books_per_request"),
    "no hash": lambda redis, keys: redis.set(keys.config, "x"),
}


@pytest.mark.parametrize("edit", list(CONFIG_NOT_HELD.values()), ids=list(CONFIG_NOT_HELD))
async def test_commit_under_limits_the_namespace_does_not_hold_changes_nothing(
    redis: Redis, keys: Keys, scripts: Scripts, edit: Callable[[Redis, Keys], Awaitable[object]]
) -> None:
    """Older data or a hand edit: the worker's heartbeat, run at once, sets it right; a
    stale worker must not commit meanwhile."""
    records = await busy_batch(redis, keys)
    await publish(redis, keys, 1)
    await edit(redis, keys)
    before = await snapshot(redis, keys)

    result = await commit(redis, scripts, keys, *records, capacity=1, published=True)

    assert result[0] == -2, result
    await assert_unchanged(redis, keys, before)


@pytest.mark.parametrize(
    "published",
    [
        Limits(storage_capacity=1).fields(),
        {"storage_capacity": "01", "max_books_per_user": "5.0", "max_books_per_request": "50"},
        {},
    ],
    ids=["as published", "the same numbers written otherwise", "none published (a Redis that lost its data)"],
)
async def test_commit_under_the_namespaces_limits_goes_through(
    redis: Redis, keys: Keys, scripts: Scripts, published: dict[str, str]
) -> None:
    records = await busy_batch(redis, keys)
    for name, value in published.items():
        await redis.hset(keys.config, name, value)

    assert await commit(redis, scripts, keys, *records, capacity=1, published=True) == [1] * len(records)


async def test_commit_out_of_memory_changes_nothing(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    redis = each_server
    records = await busy_batch(redis, keys)
    await scripts.load(redis)
    await publish(redis, keys, 1)
    before = await snapshot(redis, keys)

    async with out_of_memory(redis):
        error, commands = await monitored_error(redis, keys, lambda: commit(redis, scripts, keys, *records, capacity=1))

    await assert_unchanged(redis, keys, before)
    assert is_oom(error), str(error)
    if await server_major(redis) >= 7:
        # The shebang declares no allow-oom: Redis refuses the script before it runs.
        assert isinstance(error, OutOfMemoryError)
        assert script_commands(commands) == []
    else:
        # Redis 6.2 refuses the first write that needs memory: the XADD, before any other.
        assert script_commands(commands)
        assert not [c.text for c in script_commands(commands) if c.writes]


# -- each user's books set ------------------------------------------------------------


async def test_commit_keeps_each_users_books_set_with_lent_books(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.sadd(keys.storage, "s1")
    await redis.sadd(keys.user_books("bob"), "b1")
    await redis.hset(keys.lent_books, "b1", "bob")
    await redis.set(keys.user_count("bob"), 1)
    lend = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(lend), "s1")
    await redis.hset(keys.grants, "g1", lend)
    back = await pending_entry(redis, keys.return_requests)

    result = await commit(
        redis, scripts, keys, accepted(lend, "ada", stored=["s1"], granted=["g1"]), returned(back, "bob", books=["b1"])
    )

    assert result == [1, 1]
    assert await members(redis, keys.user_books("ada")) == {"s1", "g1"}
    assert not await redis.exists(keys.user_books("bob")), "a user who returned everything has no set"


async def test_commit_denied_lend_leaves_the_books_set_alone(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    lend = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, "g1", lend)

    await commit(redis, scripts, keys, denied(lend, "ada", granted=["g1"]))

    assert not await redis.exists(keys.user_books("ada"))


async def test_commit_with_a_books_set_of_the_wrong_type_changes_nothing(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    lend = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, "g1", lend)
    await redis.set(keys.user_books("ada"), "not a set")

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await commit(redis, scripts, keys, accepted(lend, "ada", granted=["g1"]))

    assert not await redis.exists(keys.lent_books)
    assert await is_pending(redis, keys.lend_requests, lend)
