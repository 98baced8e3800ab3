"""A bounded set of work in flight: at most ``limit`` items, each tracked by its task.

Like aiojobs' scheduler, but counted in items rather than jobs: one task processes a
batch of entries, and each entry takes a place. A place is freed when its task ends,
whatever way it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class InFlight(Generic[K]):
    """Tasks in flight, by the items (e.g. stream entries) they work on.

    :param limit: how many items may be in flight at once.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._tasks: dict[K, asyncio.Task[None]] = {}
        self._freed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, item: object) -> bool:
        return item in self._tasks

    def items(self) -> set[K]:
        return set(self._tasks)

    @property
    def free(self) -> int:
        return self.limit - len(self._tasks)

    def start(self, items: Collection[K], work: Coroutine[Any, None, None]) -> asyncio.Task[None]:
        """Run ``work`` in a task that holds a place for each of ``items`` until it ends.
        (The caller checks ``free`` first: a place is never refused.)"""
        task = asyncio.create_task(work)
        for item in items:
            self._tasks[item] = task
        task.add_done_callback(lambda _task: self._release(items))
        return task

    def _release(self, items: Collection[K]) -> None:
        for item in items:
            self._tasks.pop(item, None)
        self._freed.set()

    async def wait_for_room(self, places: int, timeout_s: float) -> bool:
        """Wait until ``places`` places are free; ``False`` after ``timeout_s`` without."""
        while self.free < places:
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), timeout=timeout_s)
            except TimeoutError:
                return False
        return True

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every task to end, then cancel what is left (and
        give it a second to unwind); ``True`` when all ended by themselves."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(set(self._tasks.values()), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        return not pending
