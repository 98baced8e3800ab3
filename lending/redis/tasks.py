"""Stopping tasks that make Redis calls.

On Python 3.11 such a task can lose a cancellation: redis-py wraps socket writes in
``asyncio.wait_for``, which returns the write's result when the cancellation comes as
the write completes. A shutdown must not wait for ever on that: it cancels again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog

log = structlog.get_logger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout_s: float = 5.0, every_s: float = 0.1) -> bool:
    """Cancel ``tasks`` and wait for them to end, cancelling again every ``every_s`` while
    one lingers, for at most ``timeout_s``; ``True`` when all ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {task for task in tasks if not task.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=every_s)
    if pending:
        log.warning("some tasks did not end; stopping anyway", tasks=len(pending))
    return not pending
