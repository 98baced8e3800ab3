"""InFlight: at most ``limit`` items in flight, a place freed whenever its task ends, and at
most ``max_tasks`` young tasks before it waits."""

from __future__ import annotations

import asyncio

import pytest

from lending.redis.inflight import InFlight


async def test_each_item_takes_a_place_until_its_task_ends() -> None:
    inflight: InFlight[str] = InFlight(3)
    gate = asyncio.Event()

    async def work() -> None:
        await gate.wait()

    inflight.start(["a", "b"], work())
    assert (len(inflight), inflight.free, "a" in inflight, "c" in inflight) == (2, 1, True, False)
    assert not await inflight.wait_for_room(2, timeout_s=0.05)

    gate.set()
    assert await inflight.wait_for_room(3, timeout_s=1)
    assert inflight.items() == set()


async def test_a_failing_or_cancelled_task_frees_its_places() -> None:
    inflight: InFlight[str] = InFlight(2)

    async def fail() -> None:
        raise RuntimeError("boom")

    async def forever() -> None:
        await asyncio.Event().wait()

    failing = inflight.start(["a"], fail())
    hanging = inflight.start(["b"], forever())
    await asyncio.wait([failing])
    assert inflight.items() == {"b"}
    hanging.cancel()
    assert await inflight.wait_for_room(2, timeout_s=1)
    assert isinstance(failing.exception(), RuntimeError)


async def test_drain_waits_then_cancels_what_is_left() -> None:
    inflight: InFlight[str] = InFlight(2)

    async def quick() -> None:
        await asyncio.sleep(0.01)

    async def forever() -> None:
        await asyncio.Event().wait()

    inflight.start(["a"], quick())
    assert await inflight.drain(timeout_s=1)
    stuck = inflight.start(["b"], forever())
    assert not await inflight.drain(timeout_s=0.05)
    assert stuck.cancelled()
    assert len(inflight) == 0


async def test_while_max_tasks_young_tasks_run_there_is_no_room_until_one_ends() -> None:
    inflight: InFlight[str] = InFlight(10, max_tasks=2, patience_s=30)
    first, second = asyncio.Event(), asyncio.Event()

    async def until(gate: asyncio.Event) -> None:
        await gate.wait()

    inflight.start(["a"], until(first))
    assert await inflight.wait_for_room(1, timeout_s=1), "one task of two: room"
    inflight.start(["b"], until(second))
    assert inflight.free == 8
    assert not await inflight.wait_for_room(1, timeout_s=0.05), "two young tasks: no room, though places are free"

    first.set()
    assert await inflight.wait_for_room(1, timeout_s=1)
    second.set()


async def test_a_task_older_than_the_patience_no_longer_holds_back_the_next() -> None:
    inflight: InFlight[str] = InFlight(10, max_tasks=1, patience_s=0.05)
    gate = asyncio.Event()

    async def slow() -> None:
        await gate.wait()

    task = inflight.start(["a"], slow())
    assert await inflight.wait_for_room(1, timeout_s=5), "room once the task is older than the patience"
    assert not task.done()
    gate.set()


async def test_without_max_tasks_only_places_count() -> None:
    inflight: InFlight[str] = InFlight(3)
    gate = asyncio.Event()

    async def work() -> None:
        await gate.wait()

    for item in "ab":
        inflight.start([item], work())
    assert await inflight.wait_for_room(1, timeout_s=0.05)
    gate.set()


def test_max_tasks_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="max_tasks"):
        InFlight(3, max_tasks=0)
