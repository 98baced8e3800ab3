"""A shelving grant is never lost: from the moment shelving hands a book out, the grants
ledger names the request it went to, until a commit lends or stores it or a
reconciliation gives it back (issue 8, item 1).

The dangerous case is a late grant: a worker stalls past ``--claim-idle-ms`` before its
shelving call, another worker takes the request over and finishes it, the book comes
back to shelving, and then the stalled worker's call hands the book to the finished
request anew.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Awaitable, Sequence

from redis.asyncio import Redis

from lending.faults import FAULT_EXIT_CODE
from lending.keys import LENDING_GROUP, Keys
from lending.ops.checker import check
from lending.redis.consumer import Delivery, ensure_group
from lending.redis.scripts import Scripts
from lending.service.lending import LendingService
from lending.service.shelving import Grant
from lending.service.shelving_mock import ShelvingService
from lending.settings import Limits, Settings

from .conftest import StartWorker
from .support import event_for, process_one, raw_streams, send, start_worker_process, stop_process, wait_until
from .test_reliability import deliver, drain_shelving_returns


class LateShelving(ShelvingService):
    """The real shelving mock; its first call waits at a gate the test opens, and then
    runs ``after`` (the test's way to interfere between the grant and the commit)."""

    def __init__(self, client: Redis, keys: Keys, scripts: Scripts) -> None:
        super().__init__(client, keys, scripts)
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()
        self.after: list[Awaitable[object]] = []

    async def get_many(self, asks: Sequence[tuple[str, str]]) -> list[Grant]:
        self.reached.set()
        await self.gate.wait()
        grants = await super().get_many(asks)
        for step in self.after:
            await step
        self.after = []
        return grants


async def finish_elsewhere_and_return(redis: Redis, keys: Keys, settings: Settings, entry: str) -> None:
    """Worker B takes ``entry`` over, lends b1 to ada; ada returns it; storage has no
    room, so it goes back to shelving, which frees it."""
    scripts = Scripts()
    live = LendingService(redis, settings.replace(worker_id="B"), scripts, ShelvingService(redis, keys, scripts))
    event = await process_one(live, await deliver(redis, keys, "B", entry, claim=True))
    assert event is not None and (event.status, event.books) == ("accepted", ("b1",))
    back = await send(redis, keys, "return", "ada", ["b1"])
    reply = raw_streams(await redis.xreadgroup(LENDING_GROUP, "B", {keys.return_requests: ">"}, count=1))
    ((_, ((_, fields),)),) = reply
    returned = await process_one(live, Delivery(keys.return_requests, back, fields, 1))
    assert returned is not None and returned.status == "returned"
    await drain_shelving_returns(redis, keys, settings)
    assert await redis.hlen(keys.shelving_state) == 0


async def test_a_late_grant_survives_a_watch_conflict_and_goes_back(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    settings = settings.replace(storage_capacity=0)
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    await ensure_group(redis, keys.return_requests, LENDING_GROUP)
    entry = await send(redis, keys, "lend", "ada", ["b1"])
    scripts = Scripts()
    late = LateShelving(redis, keys, scripts)
    stalled_service = LendingService(redis, settings.replace(worker_id="A"), scripts, late)
    stalled = asyncio.create_task(process_one(stalled_service, await deliver(redis, keys, "A", entry, claim=False)))
    await late.reached.wait()
    await finish_elsewhere_and_return(redis, keys, settings, entry)

    # A resumes: shelving hands b1 to the finished request anew; then ada's count (which
    # A watches) changes before A's commit, so A has to go round again.
    count_key = keys.user_count("ada")
    late.after = [redis.set(count_key, 0), redis.delete(count_key)]
    late.gate.set()
    assert await stalled is None  # A committed nothing: the request was finished
    await drain_shelving_returns(redis, keys, settings)

    assert await redis.hlen(keys.shelving_state) == 0, "a grant to a finished request was lost"
    assert await redis.hlen(keys.grants) == 0
    report = await check(
        redis,
        keys.namespace,
        limits=Limits(max_books_per_user=settings.max_books_per_user, storage_capacity=settings.storage_capacity),
    )
    assert report.clean, report.violations


async def test_the_reconciliation_gives_back_a_grant_nobody_settled(
    redis: Redis, keys: Keys, settings: Settings, start_worker: StartWorker
) -> None:
    """As if a worker died between its shelving call and its commit: the grant is in the
    ledger, its request finished. Every worker reconciles the ledger now and then."""
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    finished = await send(redis, keys, "lend", "ada", ["b1"])
    await start_worker(reconcile_interval_ms=200)
    await event_for(redis, keys, "lend", finished)
    grants = await ShelvingService(redis, keys, Scripts()).get_many([("late", finished)])
    assert grants == [Grant.NEW]
    assert await redis.hget(keys.grants, "late") == finished.encode()

    await wait_until(lambda: _not_handed_out(redis, keys, "late"), timeout_s=5)
    assert await redis.hlen(keys.grants) == 0
    assert await redis.hget(keys.shelving_state, "b1") == finished.encode()  # lent: left alone


async def test_the_reconciliation_leaves_grants_of_requests_in_progress(
    redis: Redis, keys: Keys, settings: Settings, start_worker: StartWorker
) -> None:
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    entry = await send(redis, keys, "lend", "ada", ["b1"])
    await deliver(redis, keys, "someone-else", entry, claim=False)  # in progress elsewhere
    await ShelvingService(redis, keys, Scripts()).get_many([("b1", entry)])
    await start_worker(reconcile_interval_ms=100, claim_idle_ms=60_000)
    await asyncio.sleep(0.5)
    assert await redis.hget(keys.grants, "b1") == entry.encode()
    assert await redis.hget(keys.shelving_state, "b1") == entry.encode()
    assert await redis.xlen(keys.shelving_returns) == 0


async def _nothing_handed_out(redis: Redis, keys: Keys) -> bool:
    return await redis.hlen(keys.shelving_state) == 0


async def test_a_worker_frozen_in_its_shelving_call_loses_no_book(
    redis: Redis, keys: Keys, redis_url: str, namespace: str, settings: Settings
) -> None:
    """The issue's reproduction, with real processes: worker A is SIGSTOPped during a
    slow shelving call; B takes the request over, lends the book, takes it back and
    hands it to shelving; A resumes, is handed the book anew, and dies before its
    commit. The book must go back to shelving."""
    common = ("--claim-idle-ms", "1000", "--storage-capacity", "0")
    a = start_worker_process(
        "A", redis_url, namespace, *common, "--shelving-latency-ms", "3000", LENDING_FAULT="after_shelving"
    )
    b = None
    try:
        entry = await send(redis, keys, "lend", "ada", ["b1"])
        await wait_until(lambda: _pending_on(redis, keys, entry, "A"))
        # A reserves in a few milliseconds, then its shelving call takes 1.5 s or more:
        # stopped now, it is stopped inside the call.
        await asyncio.sleep(0.3)
        os.kill(a.pid, signal.SIGSTOP)
        b = start_worker_process("B", redis_url, namespace, *common, "--reconcile-interval-ms", "300")
        event = await event_for(redis, keys, "lend", entry, timeout_s=15)
        assert (event.status, event.books) == ("accepted", ("b1",))
        back = await send(redis, keys, "return", "ada", ["b1"])
        assert (await event_for(redis, keys, "return", back)).status == "returned"
        await wait_until(lambda: _nothing_handed_out(redis, keys))

        os.kill(a.pid, signal.SIGCONT)
        try:
            assert a.wait(timeout=15) == FAULT_EXIT_CODE  # handed b1 out anew, then died
        except subprocess.TimeoutExpired:
            raise AssertionError(f"A did not reach its fault point:\n{stop_process(a)[2][-3000:]}") from None
        await wait_until(lambda: _nothing_handed_out(redis, keys), timeout_s=10)
        assert await redis.hlen(keys.grants) == 0
        report = await check(
            redis,
            namespace,
            wait_quiescent_s=10,
            limits=Limits(max_books_per_user=settings.max_books_per_user, storage_capacity=0),
        )
        assert report.clean, report.violations
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
        stop_process(a)
        if b is not None:
            assert stop_process(b)[0] == 0


async def _not_handed_out(redis: Redis, keys: Keys, book: str) -> bool:
    return not await redis.hexists(keys.shelving_state, book)


async def _pending_on(redis: Redis, keys: Keys, entry: str, consumer: str) -> bool:
    pending = await redis.xpending_range(keys.lend_requests, LENDING_GROUP, min=entry, max=entry, count=1)
    return bool(pending) and pending[0]["consumer"] == consumer.encode()
