"""Stopping tasks that may lose a cancellation (Python 3.11, inside a Redis call): they
are cancelled again until they end."""

from __future__ import annotations

import asyncio
import contextlib

from lending.redis.tasks import cancel_and_wait
from simulator.run import _sigterm_cancels_the_run, _Termination


async def swallowing(limit: list[int], swallowed: list[int]) -> None:
    """Loses its first ``limit[0]`` cancellations, as a task inside redis-py's wait_for can."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if len(swallowed) >= limit[0]:
                raise
            swallowed.append(1)


async def test_a_task_that_loses_cancellations_is_cancelled_until_it_ends() -> None:
    swallowed: list[int] = []
    task = asyncio.create_task(swallowing([3], swallowed))
    await asyncio.sleep(0)

    assert await cancel_and_wait([task], timeout_s=5.0, every_s=0.01) is True
    assert task.cancelled() and len(swallowed) == 3


async def test_a_task_that_never_ends_is_given_up_after_the_timeout() -> None:
    swallowed: list[int] = []
    limit = [10**9]
    task = asyncio.create_task(swallowing(limit, swallowed))
    await asyncio.sleep(0)

    assert await cancel_and_wait([task], timeout_s=0.2, every_s=0.01) is False
    assert not task.done() and len(swallowed) >= 2

    limit[0] = 0
    assert await cancel_and_wait([task], timeout_s=5.0) is True


async def test_the_simulators_sigterm_cancels_again_until_the_run_unwinds() -> None:
    swallowed: list[int] = []
    started = asyncio.Event()
    terminations: list[_Termination] = []
    unwound: list[bool] = []

    async def run() -> None:
        with _sigterm_cancels_the_run() as termination:
            terminations.append(termination)
            try:
                started.set()
                await swallowing([1], swallowed)
            finally:
                termination.unwinding = True
                await asyncio.sleep(1.5)  # a clean-up longer than the re-cancel interval
                unwound.append(termination.requested)

    task = asyncio.create_task(run())
    await started.wait()
    terminations[0]()  # as SIGTERM does; the run loses this first cancellation

    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert task.cancelled() and swallowed == [1]
    assert unwound == [True]  # cancelled again, and its clean-up was not cut short
