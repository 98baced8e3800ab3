"""InFlight: at most ``limit`` items in flight, a place freed whenever its task ends."""

from __future__ import annotations

import asyncio

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
