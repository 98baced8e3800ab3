"""A bounded set of work in flight: at most ``limit`` items, each tracked by its task.

Like aiojobs' scheduler, but counted in items rather than jobs: one task processes a
batch of entries, and each entry takes a place. A place is freed when its task ends,
whatever way it ends.

It also holds back new work while ``max_tasks`` tasks are young: a worker that starts a
batch for every entry the moment it arrives pays three round trips per entry under
load, where one that waits for a batch to finish reads what came meanwhile as one
bigger batch, for the same three round trips. A task stops counting once it is older
than ``patience_s``, so one slow batch (a slow shelving call) does not hold back the
rest for its whole time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Collection, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: The shortest wait for a task to turn old, in seconds.
MIN_WAIT_S = 0.001


class InFlight(Generic[K]):
    """Tasks in flight, by the items (e.g. stream entries) they work on.

    :param limit: how many items may be in flight at once.
    :param max_tasks: how many tasks younger than ``patience_s`` may be in flight before
        ``wait_for_room`` waits (``None``: no bound but ``limit``).
    """

    def __init__(self, limit: int, max_tasks: int | None = None, patience_s: float = 0.05) -> None:
        if max_tasks is not None and max_tasks < 1:
            raise ValueError(f"max_tasks must be at least 1 (or None), not {max_tasks}")
        self.limit = limit
        self.max_tasks = max_tasks
        self.patience_s = patience_s
        self._tasks: dict[K, asyncio.Task[None]] = {}
        self._started: dict[asyncio.Task[None], float] = {}  # task -> loop time it started
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
        self._started[task] = asyncio.get_running_loop().time()
        task.add_done_callback(lambda done: self._release(done, items))
        return task

    def _release(self, task: asyncio.Task[None], items: Collection[K]) -> None:
        for item in items:
            self._tasks.pop(item, None)
        self._started.pop(task, None)
        self._freed.set()

    async def wait_for_room(self, places: int, timeout_s: float) -> bool:
        """Wait until ``places`` places are free and fewer than ``max_tasks`` tasks are
        young; ``False`` after ``timeout_s`` without."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (wait_s := self._room_in(places, loop.time())) > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._freed.clear()
            with contextlib.suppress(TimeoutError):  # a task's age may have made room
                await asyncio.wait_for(self._freed.wait(), timeout=min(wait_s, remaining))
        return True

    def _room_in(self, places: int, now: float) -> float:
        """0 when there is room now; else how long until a task's age may make room
        (``inf``: only a task's end can)."""
        if self.free < places:
            return math.inf
        if self.max_tasks is None:
            return 0.0
        # When each young task turns old, earliest first.
        ends = sorted(e for t in self._started.values() if (e := t + self.patience_s) > now)
        if len(ends) < self.max_tasks:
            return 0.0
        # Room once all but max_tasks - 1 of them are old. At least a millisecond: uvloop's
        # clock moves by milliseconds, and a shorter wait would come back to the same time.
        return max(ends[len(ends) - self.max_tasks] - now, MIN_WAIT_S)

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
