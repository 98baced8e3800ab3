"""finish.lua: finish a request entry that keeps failing (event, dead letter, give-back, ack)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, Unpack

import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ResponseError

from lending.domain.commit import Fail, encode_finish
from lending.domain.events import FAILED, Event
from lending.keys import LEND, LENDING_GROUP, RETURN, Keys
from lending.redis.scripts import Arg, Scripts

from ..support import all_events, hash_of, members
from .conftest import (
    assert_reads_then_writes,
    assert_unchanged,
    contexts_of,
    fill_stream,
    finished_entry,
    is_oom,
    is_pending,
    monitored,
    monitored_error,
    out_of_memory,
    pending_entry,
    returned_books,
    script_commands,
    server_major,
    snapshot,
    stream_fields,
    stream_items,
    undelivered_entry,
)

LETTER = {"error": "boom", "deliveries": "5"}


def failed(entry: str, action: str = LEND, reason: str = "processing failed: boom") -> Event:
    return Event(entry, action, "ada", FAILED, skipped=("b1", "b2"), reason=reason)


def finish_call(
    keys: Keys,
    entry: str,
    *,
    stream: str | None = None,
    capacity: int = 20,
    lend: bool = True,
    books: Sequence[str] = (),
    event: Event | None = None,
    letter: Mapping[str, str] = LETTER,
    maxlen: int = 100,
    gone: bool = False,
) -> tuple[list[str], list[Arg]]:
    """finish.lua's KEYS and ARGV, from the package's one encoder (``stream`` overrides
    the entry's stream, to call it on another one)."""
    event = event or failed(entry, LEND if lend else RETURN)
    call_keys, args = encode_finish(keys, LENDING_GROUP, capacity, maxlen, Fail(event, tuple(books), letter, gone))
    if stream is not None:
        call_keys[0] = stream
    return call_keys, args


class FinishOptions(TypedDict, total=False):
    """The keyword options of ``finish_call``."""

    stream: str | None
    capacity: int
    lend: bool
    books: Sequence[str]
    event: Event | None
    letter: Mapping[str, str]
    maxlen: int
    gone: bool


async def finish(redis: Redis, scripts: Scripts, keys: Keys, entry: str, **options: Unpack[FinishOptions]) -> Any:
    """Run finish.lua; ``options`` as for ``finish_call``."""
    return await scripts.finish(redis, *finish_call(keys, entry, **options))


# -- giving back the reservation -----------------------------------------------------------


async def test_a_deleted_lend_no_longer_pending_is_finished_once_while_its_reservation_holds_books(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Redis 7 drops a deleted entry from the pending list when it is claimed: the
    reservation, not the pending list, then says that the request is not finished."""
    entry = await finished_entry(redis, keys.lend_requests)  # not pending any more
    await redis.sadd(keys.reservation(entry), "r1")

    assert await finish(redis, scripts, keys, entry, gone=False) == 0  # no longer pending: not ours
    assert await finish(redis, scripts, keys, entry, gone=True) == 1
    assert await finish(redis, scripts, keys, entry, gone=True) == 0  # the reservation is gone: done

    assert await members(redis, keys.storage) == {"r1"}
    assert [event.request_id for event in await all_events(redis, keys)] == [entry]


async def test_a_deleted_lend_that_holds_nothing_and_is_not_pending_is_left_alone(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Finished and acknowledged by a worker, then trimmed: no second outcome."""
    entry = await finished_entry(redis, keys.lend_requests)

    assert await finish(redis, scripts, keys, entry, gone=True) == 0
    assert await all_events(redis, keys) == []


async def test_finish_refills_storage_up_to_capacity_and_sends_the_rest_to_shelving(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.storage, "already")
    reserved = {"r1", "r2", "r3", "r4", "r5"}
    await redis.sadd(keys.reservation(entry), *reserved)

    assert await finish(redis, scripts, keys, entry, capacity=3) == 1

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

    assert await finish(redis, scripts, keys, entry, capacity=capacity) == 1

    assert len(await members(redis, keys.storage) - stored) == to_storage
    returns = await stream_fields(redis, keys.shelving_returns)
    assert len(returned_books(returns)) == to_shelving
    assert len(returns) == (1 if to_shelving else 0)
    assert not await redis.exists(keys.reservation(entry))


@pytest.mark.parametrize(
    ("published", "to_storage"),
    [(None, 3), ("20", 3), ("1", 1), ("0", 0), ("no hash", 3)],
    ids=["none published", "a larger one", "a smaller one", "none at all", "a config that is no hash"],
)
async def test_finish_fills_storage_no_further_than_the_namespaces_capacity(
    redis: Redis, keys: Keys, scripts: Scripts, published: str | None, to_storage: int
) -> None:
    """A worker that stalled while the others were restarted with a smaller capacity
    dead-letters under its own (3 here): storage gets no more than the namespace's."""
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "r1", "r2", "r3")
    if published == "no hash":
        await redis.set(keys.config, "x")  # a hand edit: publishes none
    elif published is not None:
        await redis.hset(keys.config, "storage_capacity", published)

    assert await finish(redis, scripts, keys, entry, capacity=3) == 1

    assert len(await members(redis, keys.storage)) == to_storage
    assert len(returned_books(await stream_fields(redis, keys.shelving_returns))) == 3 - to_storage


async def test_finish_sends_books_back_with_their_context_and_out_of_the_record(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "r1", "r2")
    await redis.hset(keys.from_shelving, mapping={"r1": entry, "kept": "r9"})

    await finish(redis, scripts, keys, entry, capacity=0)

    (returns,) = await stream_fields(redis, keys.shelving_returns)
    # The books come in set order: check each book's context. r2 has none on record.
    assert contexts_of(returns) == {"r1": entry, "r2": ""}
    assert await hash_of(redis, keys.from_shelving) == {"kept": "r9"}


# -- giving back the grants the ledger names the request for -------------------------------


async def test_finish_gives_back_the_grants_the_ledger_names_the_request_for(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # The request's books: g1, g2 handed to it; g3's ledger entry names another request;
    # g4 has none. Storage has room for two: the reservation's book first, then g1.
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "r1")
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry, "g3": "r-other", "x": "r9"})

    assert await finish(redis, scripts, keys, entry, capacity=2, books=["g1", "g2", "g3", "g4"]) == 1

    assert await members(redis, keys.storage) == {"r1", "g1"}
    # g1 stays in the library under the context it was handed out to; g2 goes back with it.
    assert await hash_of(redis, keys.from_shelving) == {"g1": entry}
    assert await stream_fields(redis, keys.shelving_returns) == [{"book_ids": "g2", "context_ids": entry}]
    assert await hash_of(redis, keys.grants) == {"g3": "r-other", "x": "r9"}
    assert not await redis.exists(keys.reservation(entry))
    assert not await is_pending(redis, keys.lend_requests, entry)


@pytest.mark.parametrize(
    ("capacity", "storage", "back", "from_shelving"),
    [
        (20, {"r1", "r2", "g1", "g2"}, {}, {"r1": "r0", "g1": "{e}", "g2": "{e}"}),
        (0, set(), {"r1": "r0", "r2": "", "g1": "{e}", "g2": "{e}"}, {}),
    ],
)
async def test_finish_gives_back_reservation_and_grants_storage_first(
    redis: Redis,
    keys: Keys,
    scripts: Scripts,
    capacity: int,
    storage: set[str],
    back: dict[str, str],
    from_shelving: dict[str, str],
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "r1", "r2")
    await redis.hset(keys.from_shelving, "r1", "r0")
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})

    assert await finish(redis, scripts, keys, entry, capacity=capacity, books=["r1", "r2", "g1", "g2"]) == 1

    assert await members(redis, keys.storage) == storage
    returns = await stream_fields(redis, keys.shelving_returns)
    assert [contexts_of(r) for r in returns] == ([{b: c.format(e=entry) for b, c in back.items()}] if back else [])
    assert await hash_of(redis, keys.from_shelving) == {b: c.format(e=entry) for b, c in from_shelving.items()}
    assert not await redis.exists(keys.grants)


# -- event, dead letter, acknowledgement ---------------------------------------------------


async def test_finish_writes_the_event_in_order_and_the_dead_letter(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)

    await finish(redis, scripts, keys, entry, event=failed(entry, reason="processing failed: no luck"))

    assert await stream_items(redis, keys.events) == [
        [
            ("request_id", entry),
            ("action", "lend"),
            ("user_id", "ada"),
            ("status", "failed"),
            ("books", ""),
            ("skipped", "b1,b2"),
            ("reason", "processing failed: no luck"),
        ]
    ]
    assert await stream_items(redis, keys.dead_letters) == [[("error", "boom"), ("deliveries", "5")]]
    assert await redis.xlen(keys.shelving_returns) == 0


async def test_finish_caps_the_dead_letters_and_counts_what_it_drops(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    for n in range(3):
        await redis.xadd(keys.dead_letters, {"earlier": str(n)})
    await redis.set(keys.dead_letters_trimmed, 5)
    first = await pending_entry(redis, keys.lend_requests)
    second = await pending_entry(redis, keys.lend_requests)

    assert await finish(redis, scripts, keys, first, maxlen=2) == 1
    assert [fields.get("error") for fields in await stream_fields(redis, keys.dead_letters)] == [None, "boom"]
    assert await redis.get(keys.dead_letters_trimmed) == b"7"

    assert await finish(redis, scripts, keys, second, maxlen=5) == 1  # room: nothing dropped
    assert await redis.xlen(keys.dead_letters) == 3
    assert await redis.get(keys.dead_letters_trimmed) == b"7"


async def test_finish_with_a_count_that_is_no_number_changes_nothing(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.set(keys.dead_letters_trimmed, "many")
    before = await snapshot(redis, keys)

    with pytest.raises(ResponseError, match="not a count"):
        await finish(redis, scripts, keys, entry)

    await assert_unchanged(redis, keys, before)


async def test_finish_writes_a_dead_letter_after_the_event(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    entry = await pending_entry(redis, keys.lend_requests)

    _, commands = await monitored(redis, keys, lambda: finish(redis, scripts, keys, entry))

    xadds = [c.text.split(" ")[1] for c in script_commands(commands) if c.name == "XADD"]
    assert xadds == [keys.events, keys.dead_letters]
    assert [e.status for e in await all_events(redis, keys)] == ["failed"]


async def test_finish_of_a_return_entry_leaves_the_reservation_and_the_ledger_alone(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # Return entries are numbered apart from lend entries: the same id may be a lend's.
    entry = await pending_entry(redis, keys.return_requests)
    await redis.sadd(keys.reservation(entry), "lend-book")
    await redis.hset(keys.grants, "g1", entry)

    assert await finish(redis, scripts, keys, entry, lend=False, books=["g1"]) == 1

    assert await members(redis, keys.reservation(entry)) == {"lend-book"}
    assert await hash_of(redis, keys.grants) == {"g1": entry}
    assert not await redis.exists(keys.storage, keys.shelving_returns)
    assert not await is_pending(redis, keys.return_requests, entry)
    assert await all_events(redis, keys) == [failed(entry, RETURN)]
    assert await redis.xlen(keys.dead_letters) == 1


@pytest.mark.parametrize("how", ["acknowledged", "never_delivered"])
async def test_finish_writes_nothing_when_the_entry_is_not_pending(
    redis: Redis, keys: Keys, scripts: Scripts, how: str
) -> None:
    if how == "acknowledged":
        entry = await finished_entry(redis, keys.lend_requests)
    else:
        entry = await undelivered_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "r1")
    await redis.hset(keys.grants, "g1", entry)
    before = await snapshot(redis, keys)

    assert await finish(redis, scripts, keys, entry, capacity=0, books=["g1"]) == 0

    await assert_unchanged(redis, keys, before)


# -- failure first -------------------------------------------------------------------------


async def busy_entry(redis: Redis, keys: Keys) -> str:
    """A lend entry whose finish writes everywhere at capacity 1: a reserved book and two
    grants, one of them into storage, the others back to shelving."""
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.sadd(keys.reservation(entry), "r1")
    await redis.hset(keys.from_shelving, "r1", "r0")
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})
    return entry


BUSY: FinishOptions = {"capacity": 1, "books": ["g1", "g2"]}


async def test_finish_reads_and_checks_everything_before_its_first_write_an_xadd(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await busy_entry(redis, keys)

    result, commands = await monitored(redis, keys, lambda: finish(redis, scripts, keys, entry, **BUSY))

    assert result == 1
    assert_reads_then_writes(commands, f"XADD {keys.events}")
    assert await redis.xlen(keys.shelving_returns) == 1


@pytest.mark.parametrize("full", ["events", "dead_letters", "shelving_returns"])
async def test_finish_into_a_full_stream_changes_nothing(
    each_server: Redis, keys: Keys, scripts: Scripts, full: str
) -> None:
    redis = each_server
    entry = await busy_entry(redis, keys)
    await fill_stream(redis, getattr(keys, full))
    before = await snapshot(redis, keys)

    error, commands = await monitored_error(redis, keys, lambda: finish(redis, scripts, keys, entry, **BUSY))

    await assert_unchanged(redis, keys, before)
    assert not [c.text for c in script_commands(commands) if c.writes]
    assert str(error).startswith("STREAMFULL"), str(error)


async def test_finish_with_shelving_returns_full_goes_through_when_nothing_goes_back(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    entry = await busy_entry(redis, keys)
    await fill_stream(redis, keys.shelving_returns)

    assert await finish(redis, scripts, keys, entry, capacity=20, books=["g1", "g2"]) == 1

    assert await members(redis, keys.storage) == {"r1", "g1", "g2"}
    assert not await is_pending(redis, keys.lend_requests, entry)


@pytest.mark.parametrize(
    "name",
    [
        "storage",
        "from_shelving",
        "grants",
        "events",
        "dead_letters",
        "shelving_returns",
        "dead_letters_trimmed",
    ],
)
async def test_finish_with_a_key_of_the_wrong_type_changes_nothing(
    each_server: Redis, keys: Keys, scripts: Scripts, name: str
) -> None:
    # Only grants to give back (no reserved book): at capacity 1, g1 goes to storage and
    # into from-shelving, g2 back to shelving and out of from-shelving.
    redis = each_server
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})
    key = getattr(keys, name)
    await redis.delete(key)
    await redis.rpush(key, "not", "the", "right", "type")
    before = await snapshot(redis, keys)

    with pytest.raises(ResponseError) as error:
        await finish(redis, scripts, keys, entry, capacity=1, books=["g1", "g2"])

    await assert_unchanged(redis, keys, before)
    assert "WRONGTYPE" in str(error.value), str(error.value)


async def test_finish_with_from_shelving_of_the_wrong_type_changes_nothing_when_all_goes_to_storage(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    # The grants go to storage and into from-shelving: nothing else reads that key first.
    entry = await pending_entry(redis, keys.lend_requests)
    await redis.hset(keys.grants, mapping={"g1": entry, "g2": entry})
    await redis.rpush(keys.from_shelving, "not", "a", "hash")
    before = await snapshot(redis, keys)

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await finish(redis, scripts, keys, entry, capacity=20, books=["g1", "g2"])

    await assert_unchanged(redis, keys, before)


async def test_finish_out_of_memory_changes_nothing(each_server: Redis, keys: Keys, scripts: Scripts) -> None:
    redis = each_server
    entry = await busy_entry(redis, keys)
    await scripts.load(redis)
    before = await snapshot(redis, keys)

    async with out_of_memory(redis):
        error, commands = await monitored_error(redis, keys, lambda: finish(redis, scripts, keys, entry, **BUSY))

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
