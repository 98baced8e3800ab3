"""Reliability: duplicate processing, the per-user limit under concurrency, poison
entries, NOSCRIPT and Redis restarts, shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from lending.keys import LENDING_GROUP, SHELVING_GROUP, Keys
from lending.redis.connection import make_client
from lending.redis.consumer import Delivery, ensure_group
from lending.redis.embedded import EmbeddedRedis, free_port
from lending.redis.scripts import Scripts
from lending.service.lending import LendingService
from lending.service.shelving import Grant
from lending.service.shelving_mock import ShelvingService
from lending.settings import Settings
from lending.worker import Worker

from .conftest import StartWorker
from .lua.conftest import pending_on
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
    start_worker_process,
    stop_process,
    wait_until,
)


class PausableShelving(ShelvingService):
    """The real shelving mock, but its calls wait at a gate the test opens."""

    def __init__(self, client: Redis, keys: Keys, scripts: Scripts) -> None:
        super().__init__(client, keys, scripts)
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    async def get_many(self, asks: Sequence[tuple[str, str]]) -> list[Grant]:
        self.reached.set()
        await self.gate.wait()
        return await super().get_many(asks)


async def deliver(redis: Redis, keys: Keys, consumer: str, entry_id: str, *, claim: bool) -> Delivery:
    """The entry as delivered to ``consumer``: read new, or claimed from another."""
    stream = keys.lend_requests
    if claim:
        ((_, fields),) = raw_entries(await redis.xclaim(stream, LENDING_GROUP, consumer, 0, [entry_id]))
    else:
        ((_, ((_, fields),)),) = raw_streams(await redis.xreadgroup(LENDING_GROUP, consumer, {stream: ">"}, count=1))
    return Delivery(stream, entry_id, fields, 1)


def services(redis: Redis, settings: Settings) -> tuple[LendingService, PausableShelving, LendingService]:
    scripts = Scripts()
    keys = Keys(settings.namespace)
    paused_shelving = PausableShelving(redis, keys, scripts)
    # Each acts as the consumer its name says: A reads the entry first, B takes it over.
    paused = LendingService(redis, settings.replace(worker_id="A"), scripts, paused_shelving)
    live = LendingService(redis, settings.replace(worker_id="B"), scripts, ShelvingService(redis, keys, scripts))
    return paused, paused_shelving, live


async def drain_shelving_returns(redis: Redis, keys: Keys, settings: Settings) -> None:
    """Act as the shelving consumer until its stream is fully processed."""
    scripts = Scripts()
    shelving = ShelvingService(redis, keys, scripts)
    await ensure_group(redis, keys.shelving_returns, SHELVING_GROUP)
    while reply := raw_streams(await redis.xreadgroup(SHELVING_GROUP, "test", {keys.shelving_returns: ">"}, count=100)):
        for _, entries in reply:
            for entry_id, fields in entries:
                await shelving.release(Delivery(keys.shelving_returns, entry_id, fields, 1))


async def stock_storage(redis: Redis, keys: Keys, *books: str) -> None:
    """Put books in storage the way a return does: fetched from shelving earlier."""
    await redis.hset(keys.shelving_state, mapping=dict.fromkeys(books, "earlier-request"))
    await redis.hset(keys.from_shelving, mapping=dict.fromkeys(books, "earlier-request"))
    await redis.sadd(keys.storage, *books)


async def assert_consistent(redis: Redis, keys: Keys, settings: Settings) -> None:
    lent = await hash_of(redis, keys.lent_books)
    storage = await members(redis, keys.storage)
    shelved = {decoded(k) for k in await redis.hkeys(keys.shelving_state)}
    assert not set(lent) & storage, "a book is both lent and in storage"
    assert len(storage) <= settings.storage_capacity
    assert shelved == set(lent) | storage, "shelving state differs from lent + storage"
    for user in set(lent.values()):
        count = int(await redis.get(keys.user_count(user)) or 0)
        assert count == sum(1 for u in lent.values() if u == user) <= settings.max_books_per_user
    assert not [k async for k in redis.scan_iter(match=keys.pattern("reservations:*"))]


# -- two workers processing the same entry ---------------------------------------


async def test_paused_worker_commits_nothing_when_another_finished_the_lend(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    await stock_storage(redis, keys, "from-storage")
    entry = await send(redis, keys, "lend", "ada", ["from-storage", "from-shelving"])
    paused, gate, live = services(redis, settings)

    # Worker A reserves the storage book, then stalls in its shelving call.
    stalled = asyncio.create_task(process_one(paused, await deliver(redis, keys, "A", entry, claim=False)))
    await gate.reached.wait()
    # Worker B takes the entry over and finishes it.
    event = await process_one(live, await deliver(redis, keys, "B", entry, claim=True))
    assert event is not None and event.status == "accepted"
    assert set(event.books) == {"from-storage", "from-shelving"}

    gate.gate.set()
    assert await stalled is None  # A noticed and committed nothing
    assert len(await all_events(redis, keys)) == 1
    assert await redis.hget(keys.lent_books, "from-shelving") == b"ada"
    assert await redis.get(keys.user_count("ada")) == b"2"
    await assert_consistent(redis, keys, settings)


async def test_paused_worker_leaves_alone_a_book_another_request_now_holds(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    settings = settings.replace(max_books_per_user=1)
    entry = await send(redis, keys, "lend", "ada", ["b1", "b2"])
    paused, gate, live = services(redis, settings)

    stalled = asyncio.create_task(process_one(paused, await deliver(redis, keys, "A", entry, claim=False)))
    await gate.reached.wait()
    # B finishes it: over ada's limit, so both books go back to storage ...
    event = await process_one(live, await deliver(redis, keys, "B", entry, claim=True))
    assert event is not None and event.status == "denied"
    assert await members(redis, keys.storage) == {"b1", "b2"}
    # ... and another request takes b2 from there.
    other = await send(redis, keys, "lend", "bob", ["b2"])
    taken = await process_one(live, await deliver(redis, keys, "B", other, claim=False))
    assert taken is not None and taken.books == ("b2",)

    # A resumes: the shelving service still says b1/b2 are "held" for A's request.
    gate.gate.set()
    assert await stalled is None
    assert await redis.hget(keys.lent_books, "b2") == b"bob"
    assert await redis.sismember(keys.storage, "b1")
    assert await redis.xlen(keys.shelving_returns) == 0  # nothing handed back by A
    assert len(await all_events(redis, keys)) == 2
    await assert_consistent(redis, keys, settings)


async def test_paused_worker_gives_back_a_book_it_got_after_the_entry_was_finished(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    settings = settings.replace(max_books_per_user=1, storage_capacity=0)
    entry = await send(redis, keys, "lend", "ada", ["b1", "b2"])
    paused, gate, live = services(redis, settings)

    stalled = asyncio.create_task(process_one(paused, await deliver(redis, keys, "A", entry, claim=False)))
    await gate.reached.wait()
    event = await process_one(live, await deliver(redis, keys, "B", entry, claim=True))
    assert event is not None and event.status == "denied"
    await drain_shelving_returns(redis, keys, settings)  # shelving took b1 and b2 back
    assert await redis.hlen(keys.shelving_state) == 0

    # A resumes and is handed b1/b2 anew; it must hand them straight back.
    gate.gate.set()
    assert await stalled is None
    await drain_shelving_returns(redis, keys, settings)
    assert await redis.hlen(keys.shelving_state) == 0
    assert len(await all_events(redis, keys)) == 1
    await assert_consistent(redis, keys, settings)


async def test_shelving_grants_are_idempotent_per_context(redis: Redis, keys: Keys) -> None:
    shelving = ShelvingService(redis, keys, Scripts())
    assert await shelving.get_many([("b", "r1")]) == [Grant.NEW]
    assert await shelving.get_many([("b", "r1")]) == [Grant.HELD]
    assert await shelving.get_many([("b", "r2")]) == [Grant.REFUSED]


# -- the per-user limit under concurrency ----------------------------------------


async def test_limit_holds_for_concurrent_requests_over_two_worker_processes(
    redis: Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    workers = [start_worker_process(f"w{i}", redis_url, namespace) for i in (1, 2)]
    try:
        ids = await asyncio.gather(*(send(redis, keys, "lend", "greedy", [f"book-{n}"]) for n in range(40)))
        events = [await event_for(redis, keys, "lend", entry, timeout_s=30) for entry in ids]
    finally:
        for proc in workers:
            assert stop_process(proc)[0] == 0
    accepted = [e for e in events if e.status == "accepted"]
    assert len(accepted) == 5
    assert await redis.get(keys.user_count("greedy")) == b"5"
    lent = await redis.hgetall(keys.lent_books)
    assert sorted(lent.values()) == [b"greedy"] * 5
    assert len(await all_events(redis, keys)) == 40


async def test_a_count_changed_after_it_was_read_makes_the_batch_decide_again(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    """WATCH/MULTI, step by step: worker A reads ada's count and waits for shelving; worker
    B lends ada a book and commits first. A's commit must not run on what it read: it is
    aborted, and A decides again under the new count."""
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    settings = settings.replace(max_books_per_user=1)
    first = await send(redis, keys, "lend", "ada", ["b1"])
    second = await send(redis, keys, "lend", "ada", ["b2"])
    paused, gate, live = services(redis, settings)

    stalled = asyncio.create_task(process_one(paused, await deliver(redis, keys, "A", first, claim=False)))
    await gate.reached.wait()  # A has read ada's count: 0
    event = await process_one(live, await deliver(redis, keys, "B", second, claim=False))
    assert event is not None and (event.status, event.books) == ("accepted", ("b2",))

    gate.gate.set()
    event = await stalled
    assert event is not None and event.status == "denied", "A lent on a count it read before B's commit"
    assert event.skipped == ("b1",)
    assert await redis.get(keys.user_count("ada")) == b"1"
    assert await hash_of(redis, keys.lent_books) == {"b2": "ada"}
    assert await members(redis, keys.storage) == {"b1"}  # A's grant, given back
    await assert_consistent(redis, keys, settings)


async def test_a_commit_redis_runs_without_its_multi_still_keeps_the_limit(
    redis: Redis, keys: Keys, settings: Settings, redis_url: str
) -> None:
    """An ACL changed under a running worker takes MULTI away: Redis refuses MULTI, runs
    the commit script on its own, unwatched, and refuses EXEC. The script checks the
    counts it was decided under itself: A's lend does not go over ada's limit, and the
    batch is a refusal (its entry waits, uncharged, for the ACL to be fixed)."""
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    settings = settings.replace(max_books_per_user=1)
    user = f"commits-{settings.namespace}"
    await redis.acl_setuser(user, enabled=True, reset=True, passwords=["+pw"], keys=["*"], commands=["+@all"])
    a_client = make_client(redis_url.replace("redis://", f"redis://{user}:pw@"))
    try:
        first = await send(redis, keys, "lend", "ada", ["b1"])
        second = await send(redis, keys, "lend", "ada", ["b2"])
        _, gate, live = services(redis, settings)
        scripts = Scripts()
        await scripts.load(redis)
        paused = LendingService(a_client, settings.replace(worker_id="A"), scripts, gate)

        stalled = asyncio.create_task(process_one(paused, await deliver(redis, keys, "A", first, claim=False)))
        await gate.reached.wait()  # A has read ada's count: 0
        event = await process_one(live, await deliver(redis, keys, "B", second, claim=False))
        assert event is not None and event.status == "accepted"
        await redis.acl_setuser(user, enabled=True, commands=["-multi"])

        gate.gate.set()
        with pytest.raises(NoPermissionError):
            await stalled
        assert await redis.get(keys.user_count("ada")) == b"1", "A's lend went over the limit"
        assert await hash_of(redis, keys.lent_books) == {"b2": "ada"}
        assert await pending_on(redis, keys.lend_requests, first) == "A"  # waits, uncharged
    finally:
        await a_client.aclose()
        await redis.acl_deluser(user)


# -- poison entries ----------------------------------------------------------------


async def test_entry_that_keeps_failing_is_dead_lettered_with_a_failed_event(
    redis: Redis, keys: Keys, start_worker: StartWorker
) -> None:
    await stock_storage(redis, keys, "in-storage")
    await start_worker(shelving_fail_rate=1.0, max_deliveries=3)
    entry = await send(redis, keys, "lend", "ada", ["in-storage", "on-shelf"])
    event = await event_for(redis, keys, "lend", entry)
    assert event.status == "failed"
    assert "ShelvingUnavailable" in event.reason
    ((_, letter),) = raw_entries(await redis.xrange(keys.dead_letters))
    assert letter[b"request_id"] == entry.encode()
    assert letter[b"deliveries"] == b"3"
    assert b"ShelvingUnavailable" in letter[b"error"]
    assert letter[b"book_ids"] == b"in-storage,on-shelf"
    # The book reserved from storage went back there; nothing is left pending.
    assert await redis.smembers(keys.storage) == {b"in-storage"}
    assert (await redis.xpending(keys.lend_requests, LENDING_GROUP))["pending"] == 0
    assert len(await all_events(redis, keys)) == 1


# -- Redis forgetting scripts, restarting ------------------------------------------


async def test_script_flush_is_survived(redis: Redis, keys: Keys, start_worker: StartWorker) -> None:
    await start_worker()
    first = await send(redis, keys, "lend", "ada", ["b1"])
    assert (await event_for(redis, keys, "lend", first)).status == "accepted"
    await redis.script_flush()
    second = await send(redis, keys, "lend", "ada", ["b2"])
    assert (await event_for(redis, keys, "lend", second)).status == "accepted"
    third = await send(redis, keys, "return", "ada", ["b1", "b2"])
    assert (await event_for(redis, keys, "return", third)).status == "returned"


async def test_worker_rides_out_a_redis_restart(tmp_path: Path, namespace: str) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), appendfsync="always")
    server.start()
    keys = Keys(namespace)
    client = make_client(server.url)
    worker_client = make_client(server.url)
    settings = Settings(worker_id="w1", redis_url=server.url, namespace=namespace, retry_base_ms=100)
    worker = Worker(settings, worker_client, handle_signals=False)
    task = asyncio.create_task(worker.run())
    try:
        first = await send(client, keys, "lend", "ada", ["b1"])
        assert (await event_for(client, keys, "lend", first)).status == "accepted"
        server.kill()
        await asyncio.sleep(0.5)
        server.start()  # same port, same data: the append-only file brings state back
        await reconnected(client)
        second = await send(client, keys, "lend", "ada", ["b2"])
        assert (await event_for(client, keys, "lend", second, timeout_s=20)).status == "accepted"
        assert await client.get(keys.user_count("ada")) == b"2"
        assert not task.done()
    finally:
        worker.stop()
        assert await asyncio.wait_for(task, 15) == 0
        await client.aclose()
        await worker_client.aclose()
        server.stop()


async def reconnected(client: Redis) -> None:
    """Ping until the client's pooled connections have been replaced."""

    async def answers() -> bool:
        try:
            return bool(await client.ping())
        except (ConnectionError, RedisConnectionError):
            return False

    await wait_until(answers)


# -- shutdown ----------------------------------------------------------------------


async def test_sigterm_handler_stops_the_worker_cleanly(redis: Redis, keys: Keys, settings: Settings) -> None:
    client = make_client(settings.effective_redis_url)
    worker = Worker(settings, client, handle_signals=False)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: redis.exists(keys.worker("w1")))
    worker.handle_sig(signal.SIGTERM)
    assert await asyncio.wait_for(task, 10) == 0
    assert not await redis.exists(keys.worker("w1"))  # the id is free again
    await client.aclose()


@pytest.mark.parametrize("force", [False, True])
async def test_worker_id_held_by_a_live_worker(
    redis: Redis, keys: Keys, start_worker: StartWorker, force: bool
) -> None:
    from lending.errors import WorkerIdTaken

    await start_worker()
    if force:
        await start_worker(force=True)
    else:
        with pytest.raises(WorkerIdTaken):
            await start_worker()


async def test_crash_loop_after_the_shelving_call_ends_in_a_dead_letter_losing_no_book(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, settings: Settings
) -> None:
    entry = await send(redis, keys, "lend", "ada", ["b1", "b2"])
    args = ("--max-deliveries", "2", "--force", "--storage-capacity", "1")
    for _ in range(2):  # each delivery dies right after shelving handed the books out
        proc = start_worker_process("w1", redis_url, namespace, *args, LENDING_FAULT="after_shelving")
        assert proc.wait(timeout=20) == 86
        stop_process(proc)
    assert await redis.hgetall(keys.shelving_state) == {b"b1": entry.encode(), b"b2": entry.encode()}
    # The third delivery is one too many: dead-lettered, and the grants given back.
    proc = start_worker_process("w1", redis_url, namespace, *args, LENDING_FAULT="after_shelving")
    try:
        event = await event_for(redis, keys, "lend", entry)
        assert event.status == "failed"
        await wait_until(lambda: redis.hlen(keys.shelving_state), timeout_s=10)
        await wait_until(lambda: _shelving_settled(redis, keys))
    finally:
        assert stop_process(proc)[0] == 0
    assert await redis.xlen(keys.dead_letters) == 1
    await assert_consistent(redis, keys, settings.replace(storage_capacity=1))
    assert await redis.scard(keys.storage) == 1 and await redis.hlen(keys.shelving_state) == 1


async def _shelving_settled(redis: Redis, keys: Keys) -> bool:
    groups = await redis.xinfo_groups(keys.shelving_returns)
    pending = sum(int(g["pending"]) for g in groups)
    last = raw_entries(await redis.xrevrange(keys.shelving_returns, count=1))
    return pending == 0 and bool(last) and all(decoded(g["last-delivered-id"]) == last[0][0] for g in groups)
