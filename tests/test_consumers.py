"""The guards of the stream consumers, as a worker wires them (not the scripts alone):
the shelving consumer frees a book only for the context it comes back from, the lending
consumer takes over another consumer's entries only once they are idle for
``claim_idle_ms``, and it runs at most ``max_batches`` young batches at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from redis.asyncio import Redis

from lending.keys import LENDING_GROUP, Keys
from lending.redis import consumer
from lending.service.shelving import Grant
from lending.worker import Worker

from .conftest import StartWorker
from .support import decoded, event_for, raw_streams, send, wait_until
from .test_service import shelving_caught_up, shelving_state

# -- the shelving consumer's context guard ----------------------------------------------------


async def test_a_book_handed_back_twice_stays_with_the_context_it_was_handed_out_to_since(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    """Two hand-backs of b1 for the context ``old`` (a worker that lost a race hands a book
    back a second time); between them shelving hands b1 out to ``new``. The second
    hand-back must not free b1 from its new holder."""
    worker = await start_worker()
    shelving = worker.shelving
    assert await shelving.get_many([("b1", "old"), ("b2", "old")]) == [Grant.NEW, Grant.NEW]

    await redis.xadd(keys.shelving_returns, {"book_ids": "b1", "context_ids": "old"})
    await wait_until(lambda: shelving_caught_up(redis, keys))
    assert await shelving_state(redis, keys) == {"b2": "old"}, "the first hand-back frees b1"

    assert await shelving.get_many([("b1", "new")]) == [Grant.NEW]
    # The second hand-back also carries b2, still handed out to "old": that one is freed,
    # which shows the entry was applied, book by book.
    await redis.xadd(keys.shelving_returns, {"book_ids": "b1,b2", "context_ids": "old,old"})
    await wait_until(lambda: shelving_caught_up(redis, keys))

    assert await shelving_state(redis, keys) == {"b1": "new"}, "the new holder lost its book"
    assert await shelving.get_many([("b1", "someone-else")]) == [Grant.REFUSED]


# -- taking over entries only once idle for claim_idle_ms --------------------------------------


def reclaims(worker: Worker) -> float:
    """Entries the worker's lending consumer took over from other consumers."""
    value = worker.metrics.registry.get_sample_value("lending_reclaims_total", {"consumer": "lending-service"})
    return value or 0.0


async def pending_by_consumer(redis: Redis, stream: str) -> dict[str, str]:
    """entry id -> the consumer it is pending on."""
    entries = await redis.xpending_range(stream, LENDING_GROUP, min="-", max="+", count=1000)
    return {decoded(e["message_id"]): decoded(e["consumer"]) for e in entries}


async def test_a_busy_consumers_entries_are_taken_over_only_once_idle_for_claim_idle_ms(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    claim_idle_ms = 2_000
    await redis.xgroup_create(keys.lend_requests, LENDING_GROUP, id="0", mkstream=True)
    entries = [await send(redis, keys, "lend", f"user-{n}", [f"book-{n}"]) for n in range(5)]
    # Consumer A reads them and is busy with them (it never acknowledges: it may be slow
    # or dead, nobody can tell until claim_idle_ms have passed).
    read_at = time.monotonic()
    reply = raw_streams(await redis.xreadgroup(LENDING_GROUP, "A", {keys.lend_requests: ">"}, count=len(entries)))
    assert [e for e, _ in reply[0][1]] == entries

    worker = await start_worker(worker_id="B", claim_idle_ms=claim_idle_ms)

    # B looks for abandoned entries as soon as it runs, then every second. While A's entries
    # are younger than claim_idle_ms, every look must leave them to A. Each sample is judged
    # by the time *after* XPENDING answered: the entries were at most that old when seen.
    samples, b_running_by = 0, None
    while True:
        owners = await pending_by_consumer(redis, keys.lend_requests)
        age_ms = (time.monotonic() - read_at) * 1000
        if age_ms >= claim_idle_ms - 100:
            break
        assert owners == dict.fromkeys(entries, "A"), f"taken from A at most {age_ms:.0f} ms after it read them"
        assert reclaims(worker) == 0
        samples += 1
        if b_running_by is None and worker.consumers[0].connected:
            b_running_by = age_ms
        await asyncio.sleep(0.02)
    assert b_running_by is not None and b_running_by < claim_idle_ms / 2, "B was not consuming in time"
    assert samples > 20

    # Idle for longer than claim_idle_ms: B takes them over and processes them.
    for entry in entries:
        assert (await event_for(redis, keys, "lend", entry)).status == "accepted"
    await wait_until(lambda: reclaims(worker) == len(entries))
    assert await pending_by_consumer(redis, keys.lend_requests) == {}


# -- many entries at once ----------------------------------------------------------------------


def test_ids_go_to_the_scripts_in_pieces_of_at_most_script_ids_in_their_order() -> None:
    """A script passes its ids to one command with Lua's unpack(), which fails at about
    8,000: a worker holding more (--concurrency allows it) sends them in several calls."""
    ids = [f"1-{k}" for k in range(2 * consumer.SCRIPT_IDS + 1)]

    pieces = consumer.in_pieces(ids)

    assert [len(piece) for piece in pieces] == [consumer.SCRIPT_IDS, consumer.SCRIPT_IDS, 1]
    assert [entry_id for piece in pieces for entry_id in piece] == ids
    assert consumer.in_pieces([]) == []


# -- at most --max-batches batches at once -------------------------------------------------------


async def test_requests_arriving_while_max_batches_run_wait_and_are_read_as_one_batch(
    redis: Redis, keys: Keys, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = await start_worker(max_batches=1, batch_patience_ms=60_000)
    asked: list[list[tuple[str, str]]] = []
    gate = asyncio.Event()
    get_many = worker.shelving.get_many

    async def held_up(asks: Sequence[tuple[str, str]]) -> list[Grant]:
        asked.append(list(asks))
        await gate.wait()
        return await get_many(asks)

    monkeypatch.setattr(worker.shelving, "get_many", held_up)
    first = await send(redis, keys, "lend", "user-0", ["book-0"])
    await wait_until(lambda: len(asked) == 1)
    later = [await send(redis, keys, "lend", f"user-{n}", [f"book-{n}"]) for n in range(1, 5)]
    await asyncio.sleep(0.3)
    pending = await redis.xpending(keys.lend_requests, LENDING_GROUP)
    assert pending["pending"] == 1, "the worker read more while its one batch ran"

    gate.set()
    for request_id in [first, *later]:
        assert (await event_for(redis, keys, "lend", request_id)).status == "accepted"
    assert [len(asks) for asks in asked] == [1, 4], "what waited was not read as one batch"


async def test_a_batch_slower_than_the_patience_does_not_hold_back_the_next(
    redis: Redis, keys: Keys, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = await start_worker(max_batches=1, batch_patience_ms=100)
    gate = asyncio.Event()
    get_many = worker.shelving.get_many

    async def first_held_up(asks: Sequence[tuple[str, str]]) -> list[Grant]:
        if any(book == "slow-book" for book, _context in asks):
            await gate.wait()
        return await get_many(asks)

    monkeypatch.setattr(worker.shelving, "get_many", first_held_up)
    slow = await send(redis, keys, "lend", "user-0", ["slow-book"])
    await wait_until(lambda: pending_count(redis, keys, 1))
    quick = await send(redis, keys, "lend", "user-1", ["book-1"])
    assert (await event_for(redis, keys, "lend", quick)).status == "accepted"
    gate.set()
    assert (await event_for(redis, keys, "lend", slow)).status == "accepted"


async def pending_count(redis: Redis, keys: Keys, count: int) -> bool:
    return bool((await redis.xpending(keys.lend_requests, LENDING_GROUP))["pending"] == count)
