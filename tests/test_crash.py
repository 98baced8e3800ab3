"""Crash tests: worker processes killed at exact steps by fault points (``LENDING_FAULT``).

A worker that reaches the named point calls ``os._exit(86)``, as a ``kill -9`` there
would. Whatever the point, the request must end with exactly one event and the state
must be consistent, whether the same worker id comes back or another worker takes the
entry over after ``--claim-idle-ms``.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator, Sequence
from typing import Protocol

import pytest
from redis.asyncio import Redis

from lending.domain.streamids import id_key
from lending.faults import FAULT_EXIT_CODE
from lending.keys import LENDING_GROUP, SHELVING_GROUP, Keys

from .support import (
    decoded,
    event_for,
    hash_of,
    members,
    raw_entries,
    send,
    start_worker_process,
    stop_process,
    stream_entries,
    wait_until,
)

CLAIM_IDLE = ("--claim-idle-ms", "500")
TOOK_OVER = "took over abandoned entries"


class Workers(Protocol):
    def __call__(self, worker_id: str, *args: str, **env: str) -> subprocess.Popen[str]: ...


@pytest.fixture
def workers(redis_url: str, namespace: str) -> Iterator[Workers]:
    """Start ``main.py`` processes (ready when returned); all are stopped at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(worker_id: str, *args: str, **env: str) -> subprocess.Popen[str]:
        proc = start_worker_process(worker_id, redis_url, namespace, *args, **env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop_process(proc)


def wait_for_crash(proc: subprocess.Popen[str], timeout_s: float = 15.0) -> str:
    """Wait for the fault point's exit code; returns the process's log."""
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the worker did not reach its fault point:\n{err[-3000:]}") from None
    assert proc.returncode == FAULT_EXIT_CODE, f"exit code {proc.returncode}:\n{err[-3000:]}"
    return err


async def events_of(redis: Redis, keys: Keys, action: str, request_id: str) -> list[dict[str, str]]:
    return [
        fields
        for _, fields in await stream_entries(redis, keys.events)
        if (fields["request_id"], fields["action"]) == (request_id, action)
    ]


async def reservation_keys(redis: Redis, keys: Keys) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=keys.pattern("reservations:*"))]


async def shelving_drained(redis: Redis, keys: Keys) -> bool:
    """Every ``shelving:returns`` entry was read by the shelving group and acknowledged."""
    last = raw_entries(await redis.xrevrange(keys.shelving_returns, count=1))
    if not last:
        return True
    groups = await redis.xinfo_groups(keys.shelving_returns)
    group = next((g for g in groups if g["name"] == SHELVING_GROUP.encode()), None)
    return (
        group is not None
        and group["pending"] == 0
        and id_key(decoded(group["last-delivered-id"])) >= id_key(last[0][0])
    )


async def assert_consistent(redis: Redis, keys: Keys, users: Sequence[str]) -> None:
    """Counts match lent-books, no reservation is left, every handed-out book is accounted for."""

    async def drained() -> bool:
        return await shelving_drained(redis, keys)

    await wait_until(drained, timeout_s=10)
    lent = await hash_of(redis, keys.lent_books)
    for user in users:
        count = int(await redis.get(keys.user_count(user)) or 0)
        assert count == sum(1 for owner in lent.values() if owner == user), (user, count, lent)
    assert await reservation_keys(redis, keys) == []
    storage = await members(redis, keys.storage)
    assert not storage & set(lent), (storage, lent)
    handed_out = await hash_of(redis, keys.shelving_state)
    lost = [book for book in handed_out if book not in lent and book not in storage]
    assert not lost, f"books the shelving service handed out that are neither lent nor in storage: {lost}"
    assert (await redis.xpending(keys.lend_requests, LENDING_GROUP))["pending"] == 0


async def assert_state_at(point: str, redis: Redis, keys: Keys, request_id: str) -> None:
    """What a crash at ``point`` leaves behind: proof that the process died exactly there."""
    reserved = await members(redis, keys.reservation(request_id))
    handed_out = await hash_of(redis, keys.shelving_state)
    events = await events_of(redis, keys, "lend", request_id)
    if point == "after_exec":
        assert reserved == set() and len(events) == 1
        assert await hash_of(redis, keys.lent_books) == {"crash-a": "ursula", "crash-b": "ursula"}
        return
    assert events == []
    assert await redis.hlen(keys.lent_books) == 0
    if point == "after_reserve":
        assert (reserved, handed_out) == ({"crash-a"}, {})
    else:  # after_shelving, before_exec: shelving grants are recorded at commit only
        assert (reserved, handed_out) == ({"crash-a"}, {"crash-b": request_id})


@pytest.mark.parametrize("point", ["after_reserve", "after_shelving", "before_exec", "after_exec"])
@pytest.mark.parametrize("resume", ["same-id", "other-id"])
async def test_crash_at_fault_point(redis: Redis, keys: Keys, workers: Workers, point: str, resume: str) -> None:
    # One book comes from automated storage, the other from the shelving service.
    await redis.sadd(keys.storage, "crash-a")
    crashing = workers("w1", *CLAIM_IDLE, LENDING_FAULT=point)
    request_id = await send(redis, keys, "lend", "ursula", ["crash-a", "crash-b"])
    wait_for_crash(crashing)
    await assert_state_at(point, redis, keys, request_id)

    # The heartbeat key survives a crash: --force takes the id back before its TTL.
    survivor = workers("w1", *CLAIM_IDLE, "--force") if resume == "same-id" else workers("w2", *CLAIM_IDLE)
    event = await event_for(redis, keys, "lend", request_id, timeout_s=10)
    assert (event.status, event.books, event.skipped) == ("accepted", ("crash-a", "crash-b"), ())
    await asyncio.sleep(1.0)  # two claim periods: a second outcome would be there by now

    assert len(await events_of(redis, keys, "lend", request_id)) == 1
    await assert_consistent(redis, keys, ["ursula"])
    assert await hash_of(redis, keys.lent_books) == {"crash-a": "ursula", "crash-b": "ursula"}
    assert await redis.get(keys.user_count("ursula")) == b"2"
    code, _, log = stop_process(survivor)
    assert code == 0, log
    if resume == "other-id" and point != "after_exec":
        assert TOOK_OVER in log, log


async def test_shelving_consumer_crash_is_taken_over(redis: Redis, keys: Keys, workers: Workers) -> None:
    books = ["shelf-a", "shelf-b"]
    lender = workers("w1")
    lend_id = await send(redis, keys, "lend", "ursula", books)
    assert (await event_for(redis, keys, "lend", lend_id)).status == "accepted"
    assert stop_process(lender)[0] == 0
    assert await hash_of(redis, keys.shelving_state) == dict.fromkeys(books, lend_id)

    # Storage capacity 0: every returned book goes back to shelving through shelving:returns.
    crashing = workers("w-fault", "--storage-capacity", "0", *CLAIM_IDLE, LENDING_FAULT="before_release")
    return_id = await send(redis, keys, "return", "ursula", books)
    wait_for_crash(crashing)
    event = await event_for(redis, keys, "return", return_id, timeout_s=1)
    assert (event.status, event.books) == ("returned", tuple(books))
    assert await hash_of(redis, keys.shelving_state) == dict.fromkeys(books, lend_id)
    assert (await redis.xpending(keys.shelving_returns, SHELVING_GROUP))["pending"] == 1

    taker = workers("w2", "--storage-capacity", "0", *CLAIM_IDLE)

    async def released() -> bool:
        return await shelving_drained(redis, keys) and not await redis.hlen(keys.shelving_state)

    await wait_until(released, timeout_s=10)

    # Released exactly once: a book handed out again afterwards stays handed out, even
    # when the crashed consumer comes back.
    again_id = await send(redis, keys, "lend", "victor", ["shelf-a"])
    assert (await event_for(redis, keys, "lend", again_id)).status == "accepted"
    assert await hash_of(redis, keys.shelving_state) == {"shelf-a": again_id}
    workers("w-fault", "--storage-capacity", "0", *CLAIM_IDLE, "--force")
    await asyncio.sleep(1.5)
    assert await hash_of(redis, keys.shelving_state) == {"shelf-a": again_id}
    assert await redis.xlen(keys.shelving_returns) == 1
    assert await redis.xlen(keys.dead_letters) == 0
    assert len(await events_of(redis, keys, "return", return_id)) == 1
    await assert_consistent(redis, keys, ["ursula", "victor"])
    code, _, log = stop_process(taker)
    assert code == 0, log
    assert any(TOOK_OVER in line and "shelving-service" in line for line in log.splitlines()), log


@pytest.mark.parametrize("point", ["after_reserve", "after_shelving"])
async def test_crash_loop_ends_dead_lettered(redis: Redis, keys: Keys, workers: Workers, point: str) -> None:
    max_deliveries = 3
    await redis.sadd(keys.storage, "loop-a")
    request_id = ""
    crashes = 0
    survivor: subprocess.Popen[str] | None = None
    # Every worker that reaches the entry dies at it; the entry must stop being
    # processed after --max-deliveries deliveries.
    for _ in range(max_deliveries + 3):
        proc = workers("w1", "--max-deliveries", str(max_deliveries), *CLAIM_IDLE, "--force", LENDING_FAULT=point)
        if not request_id:
            request_id = await send(redis, keys, "lend", "ursula", ["loop-a", "loop-b"])

        async def settled(proc: subprocess.Popen[str] = proc, request_id: str = request_id) -> bool:
            return proc.poll() is not None or bool(await events_of(redis, keys, "lend", request_id))

        await wait_until(settled, timeout_s=15)
        if proc.poll() is None:
            survivor = proc
            break
        wait_for_crash(proc)
        crashes += 1
    assert survivor is not None, f"the entry still kills workers after {crashes} crashes"
    assert crashes == max_deliveries

    await asyncio.sleep(1.0)
    events = await events_of(redis, keys, "lend", request_id)
    assert len(events) == 1
    assert events[0]["status"] == "failed"
    letters = await stream_entries(redis, keys.dead_letters)
    assert [fields["request_id"] for _, fields in letters] == [request_id]
    # The reservation was given back: the book it took from storage is there again.
    # At after_shelving the shelving service handed loop-b out each time, but no attempt
    # recorded it: it must come back too (to storage, or released by shelving).
    assert await reservation_keys(redis, keys) == []
    assert "loop-a" in await members(redis, keys.storage)
    assert await redis.hlen(keys.lent_books) == 0
    if point == "after_reserve":
        assert await members(redis, keys.storage) == {"loop-a"}
        assert await redis.hlen(keys.shelving_state) == 0
    await assert_consistent(redis, keys, ["ursula"])
    assert stop_process(survivor)[0] == 0

    # A healthy worker lends the given-back books again.
    workers("w2", *CLAIM_IDLE)
    again_id = await send(redis, keys, "lend", "ursula", ["loop-a", "loop-b"])
    event = await event_for(redis, keys, "lend", again_id)
    assert (event.status, event.books) == ("accepted", ("loop-a", "loop-b"))
    await assert_consistent(redis, keys, ["ursula"])


@pytest.mark.parametrize("capacity", ["20", "0"], ids=["returns-to-storage", "returns-to-shelving"])
async def test_paused_worker_commits_nothing_after_take_over(
    redis: Redis, keys: Keys, workers: Workers, capacity: str
) -> None:
    await redis.sadd(keys.storage, "pause-a")
    # The shelving call sleeps 0.75-2.25 s: time to freeze the worker in the middle.
    paused = workers("w1", *CLAIM_IDLE, "--storage-capacity", capacity, LENDING_SHELVING_LATENCY_MS="1500")
    request_id = await send(redis, keys, "lend", "ursula", ["pause-a", "pause-b"])

    async def reserved() -> bool:
        return bool(await redis.sismember(keys.reservation(request_id), "pause-a"))

    await wait_until(reserved, timeout_s=5, interval_s=0.01)
    paused.send_signal(signal.SIGSTOP)
    try:
        taker = workers("w2", *CLAIM_IDLE, "--storage-capacity", capacity)
        event = await event_for(redis, keys, "lend", request_id, timeout_s=10)
        assert (event.status, event.books) == ("accepted", ("pause-a", "pause-b"))
        # The books move on while the first worker sleeps: returned, then lent to someone else.
        return_id = await send(redis, keys, "return", "ursula", ["pause-a", "pause-b"])
        assert (await event_for(redis, keys, "return", return_id)).status == "returned"
        await assert_consistent(redis, keys, ["ursula"])
        victor_id = await send(redis, keys, "lend", "victor", ["pause-a", "pause-b"])
        assert (await event_for(redis, keys, "lend", victor_id)).books == ("pause-a", "pause-b")
        before = (await hash_of(redis, keys.lent_books), await hash_of(redis, keys.shelving_state))
    finally:
        paused.send_signal(signal.SIGCONT)

    await asyncio.sleep(2.5)  # the woken worker finishes its shelving call and notices
    assert len(await events_of(redis, keys, "lend", request_id)) == 1
    await assert_consistent(redis, keys, ["ursula", "victor"])
    assert (await hash_of(redis, keys.lent_books), await hash_of(redis, keys.shelving_state)) == before
    assert await hash_of(redis, keys.lent_books) == {"pause-a": "victor", "pause-b": "victor"}
    code, _, log = stop_process(paused)
    assert code == 0, log
    assert not [line for line in log.splitlines() if "processed" in line and request_id in line], log
    assert stop_process(taker)[0] == 0
