"""Every script of ``lua/``, called directly with literal keys, checked on Redis state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from lending.keys import LENDING_GROUP, SHELVING_GROUP, Keys
from lending.scripts import Arg, Scripts
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


async def pending_entry(
    redis: Redis,
    stream: str,
    group: str = LENDING_GROUP,
    *,
    consumer: str = "c1",
    entry_id: str = "*",
    **fields: str,
) -> str:
    """Add an entry to ``stream`` and deliver it to ``consumer``: it is now pending there."""
    await ensure_group(redis, stream, group)
    entry = text(await redis.xadd(stream, dict(fields or {"user_id": "ada", "book_ids": "b1"}), id=entry_id))  # type: ignore[arg-type]
    reply: Any = await redis.xreadgroup(group, consumer, {stream: ">"}, count=1)
    assert text(reply[0][1][0][0]) == entry
    return entry


async def finished_entry(redis: Redis, stream: str, group: str = LENDING_GROUP, *, entry_id: str = "*") -> str:
    """An entry delivered and acknowledged: finished by someone else."""
    entry = await pending_entry(redis, stream, group, entry_id=entry_id)
    assert await redis.xack(stream, group, entry) == 1
    return entry


async def undelivered_entry(redis: Redis, stream: str) -> str:
    """An entry in the stream that no consumer has read yet."""
    await ensure_group(redis, stream, LENDING_GROUP)
    return text(await redis.xadd(stream, {"user_id": "ada", "book_ids": "b1"}))


async def is_pending(redis: Redis, stream: str, entry: str, group: str = LENDING_GROUP) -> bool:
    return bool(await redis.xpending_range(stream, group, min=entry, max=entry, count=1))


async def pending_on(redis: Redis, stream: str, entry: str) -> str | None:
    """The consumer of the lending group ``entry`` is pending on, or None."""
    rows: Any = await redis.xpending_range(stream, LENDING_GROUP, min=entry, max=entry, count=1)
    return text(rows[0]["consumer"]) if rows else None


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


def id_range(ids: Sequence[str]) -> list[str]:
    """The lowest and highest of ``ids`` as the scripts expect them ('' and '' if none)."""
    if not ids:
        return ["", ""]
    ordered = sorted(ids, key=lambda i: tuple(int(part) for part in i.split("-")))
    return [ordered[0], ordered[-1]]


def event(
    entry: str, action: str, status: str, *, user: str = "ada", books: str = "", skipped: str = "", reason: str = ""
) -> dict[str, str]:
    return {
        "request_id": entry, "action": action, "user_id": user, "status": status,
        "books": books, "skipped": skipped, "reason": reason,
    }


# -- reserve.lua ---------------------------------------------------------------------------


def reserve_call(
    keys: Keys, requests: Sequence[tuple[str, int, Sequence[str]]], consumer: str = "c1"
) -> tuple[list[str], list[Arg]]:
    """reserve.lua's KEYS and ARGV for ``requests``: (entry id, retry flag, books) each."""
    ids = [entry for entry, _, _ in requests]
    args: list[Arg] = [LENDING_GROUP, consumer, *id_range(ids), len(requests)]
    for entry, retry, books in requests:
        args += [entry, retry, len(books), *books]
    return [keys.lend_requests, keys.lent_books, keys.storage, *(keys.reservation(i) for i in ids)], args


async def reserve(redis: Redis, scripts: Scripts, keys: Keys, *requests: tuple[str, int, Sequence[str]]) -> list[str]:
    codes, counts, holders = await scripts.reserve(redis, *reserve_call(keys, requests))
    assert counts == [] and holders == []
    return [text(c) for c in codes]


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
    return [[text(v) for v in side] for side in reply[1:]]


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


# -- reserve.lua: the reads ------------------------------------------------------------------------------


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

    assert [text(c) for c in codes] == ["12"]
    assert [text(c) for c in counts] == ["2"]
    assert [text(h) for h in holders] == ["ada", ""]
    assert await members(redis, keys.reservation(entry)) == {"s1"}


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


# -- commit.lua ------------------------------------------------------------------------------


class Batch:
    """commit.lua's KEYS and ARGV for one batch, built record by record.

    Count and reservation keys are appended after the 7 fixed keys and referred to by
    their index (1 = KEYS[8]), each numbered once.
    """

    def __init__(self, keys: Keys, *, consumer: str = "c1", capacity: int = 20) -> None:
        self.keys = keys
        self.consumer = consumer
        self.capacity = capacity
        self.extra: list[str] = []
        self.records: list[Arg] = []
        self.lend_ids: list[str] = []
        self.return_ids: list[str] = []

    def _index(self, key: str) -> int:
        if key not in self.extra:
            self.extra.append(key)
        return self.extra.index(key) + 1

    def reject(self, action: str, entry: str, user: str = "ada", reason: str = "bad request") -> Batch:
        (self.lend_ids if action == "lend" else self.return_ids).append(entry)
        self.records += ["X", action, entry, user, reason]
        return self

    def lend(
        self,
        entry: str,
        user: str = "ada",
        *,
        status: str = "accepted",
        stored: Sequence[str] = (),
        new: Sequence[str] = (),
        held: Sequence[str] = (),
        books: str | None = None,
        skipped: str = "",
        reason: str = "",
    ) -> Batch:
        if books is None:
            books = ",".join([*stored, *new, *held]) if status == "accepted" else ""
        self.lend_ids.append(entry)
        self.records += [
            "L", entry, user, self._index(self.keys.user_count(user)), self._index(self.keys.reservation(entry)),
            status, books, skipped, reason,
            len(stored), *stored, len(new), *new, len(held), *held,
        ]
        return self

    def return_books(self, entry: str, user: str = "ada", *, books: str, skipped: str = "", reason: str = "") -> Batch:
        """A return request ('T' record)."""
        self.return_ids.append(entry)
        self.records += ["T", entry, user, self._index(self.keys.user_count(user)), books, skipped, reason]
        return self

    @property
    def all_keys(self) -> list[str]:
        k = self.keys
        return [
            k.lend_requests, k.return_requests, k.events, k.lent_books, k.storage, k.shelving_returns, k.from_shelving,
            *self.extra,
        ]

    @property
    def args(self) -> list[Arg]:
        return [
            LENDING_GROUP, self.consumer, self.capacity, *id_range(self.lend_ids), *id_range(self.return_ids),
            *self.records,
        ]

    async def run(self, redis: Redis, scripts: Scripts) -> Any:
        return await scripts.commit(redis, self.all_keys, self.args)


LIMIT = "ada may not borrow more than 3 books"
NOTHING = "none of the requested books is lent to ada"


async def monitored(redis: Redis, keys: Keys, step: Callable[[], Awaitable[Any]]) -> tuple[Any, list[str]]:
    """Run ``step()`` under MONITOR: its result, and the commands Redis ran meanwhile on
    this test's keys (the commands scripts run included), in order."""
    done = f"{keys.prefix}:monitor-done"
    commands: list[str] = []
    async with redis.monitor() as monitor:
        result = await step()
        await redis.exists(done)
        while (command := (await monitor.next_command())["command"]) != f"EXISTS {done}":
            if keys.prefix in command:
                commands.append(command)
    return result, commands


# lends


async def test_commit_accepted_lend_from_storage(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.set(keys.user_count("ada"), 2)
    await redis.hset(keys.lent_books, mapping={"old1": "ada", "other": "bob"})
    await redis.sadd(keys.reservation(entry), "b2", "b1")

    result = await Batch(keys).lend(entry, stored=["b2", "b1"], skipped="x,y").run(redis, scripts)

    assert result == [1]
    assert await redis.get(keys.user_count("ada")) == b"4"
    assert await hash_of(redis, keys.lent_books) == {"old1": "ada", "other": "bob", "b1": "ada", "b2": "ada"}
    assert not await redis.exists(keys.reservation(entry))
    assert not await is_pending(redis, keys.lend_requests, entry)
    assert not await redis.exists(keys.storage, keys.shelving_returns, keys.from_shelving)
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


async def test_commit_lend_creates_a_missing_count(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "b1")

    assert await Batch(keys).lend(entry, stored=["b1"]).run(redis, scripts) == [1]

    assert await redis.get(keys.user_count("ada")) == b"1"
    assert (await stream_fields(redis, keys.events))[0]["skipped"] == ""


async def test_commit_accepted_lend_with_shelving_grants(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.set(keys.user_count("ada"), 1)
    await redis.sadd(keys.reservation(entry), "s1")
    # s1 came to storage from shelving earlier, under another context: that record stays.
    await redis.hset(keys.from_shelving, "s1", "r0")

    result = await Batch(keys).lend(entry, stored=["s1"], new=["n1", "n2"], held=["h1"]).run(redis, scripts)

    assert result == [1]
    assert await redis.get(keys.user_count("ada")) == b"5"
    assert await hash_of(redis, keys.lent_books) == {"s1": "ada", "n1": "ada", "n2": "ada", "h1": "ada"}
    assert await hash_of(redis, keys.from_shelving) == {"s1": "r0", "n1": entry, "n2": entry, "h1": entry}
    assert not await redis.exists(keys.reservation(entry), keys.shelving_returns, keys.storage)
    assert await stream_fields(redis, keys.events) == [event(entry, "lend", "accepted", books="s1,n1,n2,h1")]


async def test_commit_accepted_lend_of_grants_only(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)

    assert await Batch(keys).lend(entry, new=["n1"], held=["h1"]).run(redis, scripts) == [1]

    assert await redis.get(keys.user_count("ada")) == b"2"
    assert await hash_of(redis, keys.lent_books) == {"n1": "ada", "h1": "ada"}
    assert await hash_of(redis, keys.from_shelving) == {"n1": entry, "h1": entry}
    assert not await is_pending(redis, keys.lend_requests, entry)


@pytest.mark.parametrize(
    ("reservation", "stored"),
    [
        ({"b1", "b2"}, ["b1"]),  # another worker added to it
        ({"b1"}, ["b1", "b2"]),
        ({"b1", "b3"}, ["b1", "b2"]),  # same size, other books
        (set(), ["b1"]),  # emptied
        ({"n1"}, []),  # nothing from storage, but a grant handed over since
    ],
)
@pytest.mark.parametrize("status", ["accepted", "denied"])
async def test_commit_refuses_when_a_reservation_differs(
    redis: Redis, keys: Keys, scripts: Scripts, reservation: set[str], stored: list[str], status: str
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    if reservation:
        await redis.sadd(keys.reservation(entry), *reservation)

    result = await Batch(keys, capacity=0).lend(entry, status=status, stored=stored, new=["n2"]).run(redis, scripts)

    assert result == -1
    assert await is_pending(redis, keys.lend_requests, entry)
    assert await members(redis, keys.reservation(entry)) == reservation
    assert not await redis.exists(
        keys.user_count("ada"), keys.lent_books, keys.events, keys.from_shelving, keys.storage, keys.shelving_returns
    )


async def test_commit_minus_one_leaves_everything_untouched(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    rejected = await pending_entry(redis, keys.lend_requests)
    accepted = await pending_entry(redis, keys.lend_requests)
    denied = await pending_entry(redis, keys.lend_requests)
    elsewhere = await pending_entry(redis, keys.lend_requests, consumer="c2")
    changed = await pending_entry(redis, keys.lend_requests)
    returned = await pending_entry(redis, keys.return_requests)
    await redis.set(keys.user_count("ada"), 1)
    await redis.hset(keys.lent_books, "a1", "ada")
    await redis.hset(keys.from_shelving, mapping={"a1": "r0", "d1": "r1"})
    await redis.sadd(keys.reservation(accepted), "s1")
    await redis.sadd(keys.reservation(denied), "d1")
    await redis.sadd(keys.reservation(changed), "s2", "n9")  # n9 handed over by another worker
    await redis.sadd(keys.storage, "other")
    batch = (
        Batch(keys, capacity=1)
        .reject("lend", rejected)
        .lend(accepted, stored=["s1"], new=["n1"])
        .return_books(returned, books="a1")
        .lend(denied, "bob", status="denied", stored=["d1"], reason=LIMIT)
        .lend(elsewhere, "cy", new=["n2"], held=["h2"])  # would be handed over to c2
        .lend(changed, "dan", stored=["s2"])  # the last record: checked before anything is written
    )

    assert await batch.run(redis, scripts) == -1

    for entry in (rejected, accepted, denied, changed):
        assert await pending_on(redis, keys.lend_requests, entry) == "c1"
    assert await pending_on(redis, keys.lend_requests, elsewhere) == "c2"
    assert await pending_on(redis, keys.return_requests, returned) == "c1"
    assert await redis.get(keys.user_count("ada")) == b"1"
    assert not await redis.exists(keys.user_count("bob"), keys.user_count("cy"), keys.user_count("dan"))
    assert await hash_of(redis, keys.lent_books) == {"a1": "ada"}
    assert await hash_of(redis, keys.from_shelving) == {"a1": "r0", "d1": "r1"}
    assert await members(redis, keys.reservation(accepted)) == {"s1"}
    assert await members(redis, keys.reservation(denied)) == {"d1"}
    assert await members(redis, keys.reservation(changed)) == {"s2", "n9"}
    assert not await redis.exists(keys.reservation(elsewhere))
    assert await members(redis, keys.storage) == {"other"}
    assert not await redis.exists(keys.events, keys.shelving_returns)


async def test_commit_checks_only_the_reservations_of_its_own_lends(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    # c2 works on the entry and its reservation has grown: not ours to check.
    elsewhere = await pending_entry(redis, keys.lend_requests, consumer="c2")
    mine = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(elsewhere), "s1", "n1")
    await redis.sadd(keys.reservation(mine), "s2")

    result = await Batch(keys).lend(elsewhere, stored=["s1"]).lend(mine, "bob", stored=["s2"]).run(redis, scripts)

    assert result == [0, 1]
    assert await members(redis, keys.reservation(elsewhere)) == {"s1", "n1"}
    assert await pending_on(redis, keys.lend_requests, elsewhere) == "c2"
    assert await hash_of(redis, keys.lent_books) == {"s2": "bob"}


async def test_commit_writes_nothing_for_a_finished_lend(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "b1")

    assert await Batch(keys).lend(entry, stored=["b1"]).run(redis, scripts) == [0]

    assert not await redis.exists(keys.user_count("ada"), keys.lent_books, keys.events, keys.shelving_returns)
    assert not await redis.exists(keys.from_shelving, keys.storage)
    assert await members(redis, keys.reservation(entry)) == {"b1"}


async def test_commit_writes_nothing_for_a_lend_never_delivered(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await undelivered_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "b1")

    assert await Batch(keys).lend(entry, stored=["b1"]).run(redis, scripts) == [0]

    assert not await redis.exists(keys.user_count("ada"), keys.lent_books, keys.events)
    assert await members(redis, keys.reservation(entry)) == {"b1"}


# stale lends: grants of a lend that is not ours anymore


async def test_commit_hands_grants_to_the_consumer_still_working_on_the_entry(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await pending_entry(redis, keys.lend_requests, consumer="c2")
    await redis.sadd(keys.reservation(entry), "s1")  # what c2 reserved from storage

    result = await Batch(keys).lend(entry, new=["n1"], held=["h1"]).run(redis, scripts)

    assert result == [0]
    # c2 sees a reservation that is not what it decided on, and takes them on its retry.
    assert await members(redis, keys.reservation(entry)) == {"s1", "n1", "h1"}
    assert await hash_of(redis, keys.from_shelving) == {"n1": entry, "h1": entry}
    assert await pending_on(redis, keys.lend_requests, entry) == "c2"
    assert not await redis.exists(keys.shelving_returns, keys.events, keys.lent_books, keys.user_count("ada"))


async def test_commit_gives_back_new_grants_of_a_finished_lend_nobody_took(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await finished_entry(redis, keys.lend_requests)
    # n2 handed out anew to us, then seen as "already held" by the finishing worker, who
    # took it: the library has a record of it, it stays.
    await redis.hset(keys.from_shelving, "n2", entry)
    await redis.hset(keys.lent_books, "n2", "ada")

    result = await Batch(keys).lend(entry, new=["n1", "n2", "n3"], held=["h1"]).run(redis, scripts)

    assert result == [0]
    # Held books were handed out earlier, to whoever answers for them: left alone.
    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "n1,n3", "context_ids": f"{entry},{entry}"}]
    assert await hash_of(redis, keys.from_shelving) == {"n2": entry}
    assert await hash_of(redis, keys.lent_books) == {"n2": "ada"}
    assert not await redis.exists(keys.reservation(entry), keys.events, keys.user_count("ada"), keys.storage)


async def test_commit_finished_lend_with_held_grants_only_writes_nothing(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await finished_entry(redis, keys.lend_requests)

    assert await Batch(keys).lend(entry, held=["h1"]).run(redis, scripts) == [0]

    assert not await redis.exists(keys.shelving_returns, keys.reservation(entry), keys.from_shelving, keys.events)


# denied lends


@pytest.mark.parametrize(
    ("capacity", "in_storage", "to_storage", "back", "contexts", "from_shelving"),
    [
        # All fit: grants going to storage are recorded under the request.
        (20, 0, ["s1", "s2", "n1", "h1"], "", "", {"s1": "r0", "n1": "{e}", "h1": "{e}"}),
        (4, 0, ["s1", "s2", "n1", "h1"], "", "", {"s1": "r0", "n1": "{e}", "h1": "{e}"}),  # exactly fit
        (3, 1, ["s1", "s2"], "n1,h1", "{e},{e}", {"s1": "r0"}),
        (4, 1, ["s1", "s2", "n1"], "h1", "{e}", {"s1": "r0", "n1": "{e}"}),
        # Storage full: storage books go back under the context on record ('' when none).
        (1, 1, [], "s1,s2,n1,h1", "r0,,{e},{e}", {}),
        (1, 3, [], "s1,s2,n1,h1", "r0,,{e},{e}", {}),  # over capacity (lowered since)
        (0, 0, [], "s1,s2,n1,h1", "r0,,{e},{e}", {}),  # no storage at all
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
    await redis.set(keys.user_count("ada"), 3)

    result = await (
        Batch(keys, capacity=capacity)
        .lend(entry, status="denied", stored=["s1", "s2"], new=["n1"], held=["h1"], skipped="s1,s2,n1,h1", reason=LIMIT)
        .run(redis, scripts)
    )

    assert result == [1]
    assert await members(redis, keys.storage) == already | set(to_storage)
    expected_back = [{"book_ids": back, "context_ids": contexts.format(e=entry)}] if back else []
    assert await stream_fields(redis, keys.shelving_returns) == expected_back
    assert await hash_of(redis, keys.from_shelving) == {b: c.format(e=entry) for b, c in from_shelving.items()}
    assert not await redis.exists(keys.reservation(entry), keys.lent_books)
    assert await redis.get(keys.user_count("ada")) == b"3"
    assert not await is_pending(redis, keys.lend_requests, entry)
    assert await stream_fields(redis, keys.events) == [
        event(entry, "lend", "denied", skipped="s1,s2,n1,h1", reason=LIMIT)
    ]


async def test_commit_denied_lend_with_nothing_reserved(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.storage, "other")
    reason = "none of the requested books is available"

    result = await Batch(keys).lend(entry, status="denied", skipped="b1,b2", reason=reason).run(redis, scripts)

    assert result == [1]
    assert not await is_pending(redis, keys.lend_requests, entry)
    assert await stream_fields(redis, keys.events) == [event(entry, "lend", "denied", skipped="b1,b2", reason=reason)]
    assert await members(redis, keys.storage) == {"other"}
    assert not await redis.exists(keys.shelving_returns, keys.from_shelving, keys.lent_books, keys.user_count("ada"))


# returns


async def test_commit_return_takes_back_the_books(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "a2": "ada", "a3": "ada", "b1": "bob"})
    await redis.set(keys.user_count("ada"), 3)
    await redis.set(keys.user_count("bob"), 1)

    result = await Batch(keys).return_books(entry, books="a2,a1", skipped="b1,never").run(redis, scripts)

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

    assert await Batch(keys).return_books(entry, books="a1,a2").run(redis, scripts) == [1]

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

    await Batch(keys, capacity=2).return_books(entry, books=",".join(books)).run(redis, scripts)

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

    await Batch(keys, capacity=2).return_books(entry, books="a1,a2").run(redis, scripts)

    assert await members(redis, keys.storage) == {"s1", "s2"}
    # a1 has no record: no context, shelving frees it whoever holds it.
    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "a1,a2", "context_ids": ",r2"}]
    assert not await redis.exists(keys.from_shelving)


async def test_commit_return_denied_when_none_is_lent_to_the_user(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"b1": "bob"})
    await redis.set(keys.user_count("ada"), 3)  # whatever it says, nothing changes

    result = await Batch(keys).return_books(entry, books="", skipped="b1,x", reason=NOTHING).run(redis, scripts)

    assert result == [1]
    assert await hash_of(redis, keys.lent_books) == {"b1": "bob"}
    assert await redis.get(keys.user_count("ada")) == b"3"
    assert not await redis.exists(keys.storage, keys.shelving_returns)
    assert not await is_pending(redis, keys.return_requests, entry)
    assert await stream_fields(redis, keys.events) == [
        event(entry, "return", "denied", skipped="b1,x", reason=NOTHING)
    ]


async def test_commit_writes_nothing_for_a_finished_return(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await finished_entry(redis, keys.return_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada"})
    await redis.set(keys.user_count("ada"), 1)

    assert await Batch(keys).return_books(entry, books="a1").run(redis, scripts) == [0]

    assert await hash_of(redis, keys.lent_books) == {"a1": "ada"}
    assert await redis.get(keys.user_count("ada")) == b"1"
    assert not await redis.exists(keys.storage, keys.shelving_returns, keys.events)


# rejected entries


async def test_commit_rejected_records_for_both_actions(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    lend = await pending_entry(redis, keys.lend_requests)
    ret = await pending_entry(redis, keys.return_requests)

    result = await (
        Batch(keys)
        .reject("lend", lend, "ada", "book_ids is empty")
        .reject("return", ret, "", "missing field user_id")
        .run(redis, scripts)
    )

    assert result == [1, 1]
    assert not await is_pending(redis, keys.lend_requests, lend)
    assert not await is_pending(redis, keys.return_requests, ret)
    assert await stream_items(redis, keys.events) == [
        [
            ("request_id", lend), ("action", "lend"), ("user_id", "ada"), ("status", "rejected"),
            ("books", ""), ("skipped", ""), ("reason", "book_ids is empty"),
        ],
        [
            ("request_id", ret), ("action", "return"), ("user_id", ""), ("status", "rejected"),
            ("books", ""), ("skipped", ""), ("reason", "missing field user_id"),
        ],
    ]
    assert not await redis.exists(
        keys.lent_books, keys.storage, keys.shelving_returns, keys.from_shelving,
        keys.user_count("ada"), keys.reservation(lend),
    )


async def test_commit_writes_nothing_for_a_rejected_entry_not_mine(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    lend = await pending_entry(redis, keys.lend_requests, consumer="c2")
    ret = await finished_entry(redis, keys.return_requests)

    assert await Batch(keys).reject("lend", lend).reject("return", ret).run(redis, scripts) == [0, 0]

    assert await pending_on(redis, keys.lend_requests, lend) == "c2"
    assert not await redis.exists(keys.events)


# whole batches


async def test_commit_mixed_batch_in_record_order(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    rejected_lend = await pending_entry(redis, keys.lend_requests)
    accepted = await pending_entry(redis, keys.lend_requests)
    denied = await pending_entry(redis, keys.lend_requests)
    returned = await pending_entry(redis, keys.return_requests)
    rejected_return = await pending_entry(redis, keys.return_requests)
    await redis.sadd(keys.reservation(accepted), "b1")
    await redis.sadd(keys.reservation(denied), "b2")
    await redis.hset(keys.lent_books, "a1", "bob")
    await redis.set(keys.user_count("bob"), 1)
    await redis.set(keys.user_count("cy"), 3)

    # Records in an order of their own (not by stream, kind or entry id): events follow it.
    result = await (
        Batch(keys)
        .reject("return", rejected_return, "dan", "book_ids is empty")
        .lend(denied, "cy", status="denied", stored=["b2"], skipped="b2", reason=LIMIT)
        .return_books(returned, "bob", books="a1")
        .lend(accepted, "ada", stored=["b1"])
        .reject("lend", rejected_lend, "eve", "missing field user_id")
        .run(redis, scripts)
    )

    assert result == [1, 1, 1, 1, 1]
    assert await stream_fields(redis, keys.events) == [
        event(rejected_return, "return", "rejected", user="dan", reason="book_ids is empty"),
        event(denied, "lend", "denied", user="cy", skipped="b2", reason=LIMIT),
        event(returned, "return", "returned", user="bob", books="a1"),
        event(accepted, "lend", "accepted", user="ada", books="b1"),
        event(rejected_lend, "lend", "rejected", user="eve", reason="missing field user_id"),
    ]
    for entry in (rejected_lend, accepted, denied):
        assert not await is_pending(redis, keys.lend_requests, entry)
    for entry in (returned, rejected_return):
        assert not await is_pending(redis, keys.return_requests, entry)
    assert await hash_of(redis, keys.lent_books) == {"b1": "ada"}
    assert await redis.get(keys.user_count("ada")) == b"1"
    assert not await redis.exists(keys.user_count("bob"))
    assert await redis.get(keys.user_count("cy")) == b"3"
    assert await members(redis, keys.storage) == {"a1", "b2"}
    assert not await redis.exists(keys.reservation(accepted), keys.reservation(denied), keys.shelving_returns)


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

    result = await (
        Batch(keys)
        .lend(mine_lend, "cy", stored=["b1"])
        .lend(other_lend, "dan", stored=["b2"])
        .reject("lend", done_lend)
        .return_books(mine_return, "ada", books="a1")
        .return_books(other_return, "bob", books="a2")
        .run(redis, scripts)
    )

    assert result == [1, 0, 0, 1, 0]
    assert await pending_on(redis, keys.lend_requests, mine_lend) is None
    assert await pending_on(redis, keys.lend_requests, other_lend) == "c2"
    assert await pending_on(redis, keys.return_requests, mine_return) is None
    assert await pending_on(redis, keys.return_requests, other_return) == "c2"
    assert [e["request_id"] for e in await stream_fields(redis, keys.events)] == [mine_lend, mine_return]
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

    result = await (
        Batch(keys)
        .reject("return", "5-1")
        .reject("lend", "6-1")
        .lend("5-1", "bob", status="denied", reason=LIMIT)
        .return_books("6-1", books="a2")
        .return_books("7-1", books="a1")
        .run(redis, scripts)
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
    assert [(e["request_id"], e["action"]) for e in await stream_fields(redis, keys.events)] == [
        ("5-1", "return"), ("6-1", "lend"), ("7-1", "return"),
    ]


async def test_commit_one_incrby_per_user_with_the_net_delta(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    ada_lend = await pending_entry(redis, keys.lend_requests)
    bob_lend1 = await pending_entry(redis, keys.lend_requests)
    bob_lend2 = await pending_entry(redis, keys.lend_requests)
    ada_return = await pending_entry(redis, keys.return_requests)
    cy_return = await pending_entry(redis, keys.return_requests)
    await redis.sadd(keys.reservation(ada_lend), "b1")
    await redis.sadd(keys.reservation(bob_lend1), "b2")
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "c1": "cy", "c2": "cy"})
    await redis.set(keys.user_count("ada"), 2)
    await redis.set(keys.user_count("cy"), 2)
    batch = (
        Batch(keys)
        .lend(ada_lend, "ada", stored=["b1"])
        .lend(bob_lend1, "bob", stored=["b2"])
        .return_books(ada_return, "ada", books="a1")
        .return_books(cy_return, "cy", books="c1,c2")
        .lend(bob_lend2, "bob", new=["n1"])
    )

    result, commands = await monitored(redis, keys, lambda: batch.run(redis, scripts))

    assert result == [1, 1, 1, 1, 1]
    # ada: +1 -1 = 0, nothing to write; bob: +1 +1 in one INCRBY; cy: -2, down to zero.
    assert sorted(c for c in commands if c.startswith("INCRBY ")) == [
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
    returned = await pending_entry(redis, keys.return_requests)
    denied = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.lent_books, mapping={"a1": "ada", "a2": "ada"})
    await redis.set(keys.user_count("ada"), 2)
    await redis.sadd(keys.reservation(denied), "s1")
    await redis.hset(keys.from_shelving, mapping={"a1": "r1", "a2": "r2", "s1": "r3"})

    result = await (
        Batch(keys, capacity=1)
        .return_books(returned, books="a1,a2")
        .lend(denied, "bob", status="denied", stored=["s1"], new=["n1"], skipped="s1,n1", reason=LIMIT)
        .run(redis, scripts)
    )

    assert result == [1, 1]
    # One room in storage, taken by the first book given back in record order.
    assert await members(redis, keys.storage) == {"a1"}
    assert await stream_fields(redis, keys.shelving_returns) == [
        {"book_ids": "a2,s1,n1", "context_ids": f"r2,r3,{denied}"}
    ]
    assert await hash_of(redis, keys.from_shelving) == {"a1": "r1"}


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


async def test_finish_sends_books_back_with_their_context_and_out_of_the_record(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "r1", "r2")
    await redis.hset(keys.from_shelving, mapping={"r1": entry, "kept": "r9"})

    await scripts.finish(
        redis, finish_keys(keys, keys.lend_requests, entry), [LENDING_GROUP, entry, 0, 1, *event_args(entry)]
    )

    (returns,) = await stream_fields(redis, keys.shelving_returns)
    # The books come in set order: check each book's context. r2 has none on record.
    assert dict(zip(returns["book_ids"].split(","), returns["context_ids"].split(","))) == {"r1": entry, "r2": ""}
    assert await hash_of(redis, keys.from_shelving) == {"kept": "r9"}


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


# -- shelving_get.lua / shelving_release.lua ---------------------------------------------------


async def test_shelving_get_hands_out_idempotently_per_context(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    state = [keys.shelving_state]
    assert await scripts.shelving_get(redis, state, ["b1", "r1", "b2", "r1"]) == [1, 1]
    assert await scripts.shelving_get(redis, state, ["b1", "r1", "b3", "r1"]) == [2, 1]
    assert await scripts.shelving_get(redis, state, ["b1", "r2", "b2", "r2", "b3", "r2", "b4", "r2"]) == [0, 0, 0, 1]
    assert await hash_of(redis, keys.shelving_state) == {"b1": "r1", "b2": "r1", "b3": "r1", "b4": "r2"}


async def test_shelving_get_answers_each_pair_for_its_own_context(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    await redis.hset(keys.shelving_state, mapping={"h1": "r1", "h2": "r2"})

    codes = await scripts.shelving_get(
        redis, [keys.shelving_state], ["h1", "r1", "h2", "r1", "n1", "r1", "h2", "r2", "n2", "r2", "h1", "r3"]
    )

    assert codes == [2, 0, 1, 2, 1, 0]
    assert await hash_of(redis, keys.shelving_state) == {"h1": "r1", "h2": "r2", "n1": "r1", "n2": "r2"}


@pytest.mark.parametrize(("first", "second"), [("r1", "r2"), ("r2", "r1")])
async def test_shelving_get_book_asked_twice_in_one_call_first_wins(
    redis: Redis, keys: Keys, scripts: Scripts, first: str, second: str
) -> None:
    codes = await scripts.shelving_get(redis, [keys.shelving_state], ["b1", first, "b1", second])

    assert codes == [1, 0]
    assert await hash_of(redis, keys.shelving_state) == {"b1": first}


async def test_shelving_get_book_asked_twice_in_one_call_for_one_context(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    assert await scripts.shelving_get(redis, [keys.shelving_state], ["b1", "r1", "b1", "r1"]) == [1, 2]
    assert await hash_of(redis, keys.shelving_state) == {"b1": "r1"}


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
    assert await scripts.shelving_get(redis, [keys.shelving_state], ["b1", "r1"]) == [1]
