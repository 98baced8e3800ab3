"""Concurrent calls of one script, sent together: one write, one round trip.

Under load, many callers (the HTTP API's submissions) are ready in the same turn of
the event loop. ``ScriptBatcher`` queues their calls and sends them at the end of that
turn in one write on one connection (``wire.round_trip``): no caller waits longer than it
would have alone, and the per-command overhead (taking a connection from the pool, the
socket timeout, the release) is paid once per batch instead of once per call. Each call
still runs as its own script, atomic on its own; one that fails fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from lending.redis.scripts import Arg, Script
from lending.redis.wire import round_trip

Call = tuple[Sequence[str], Sequence[Arg], "asyncio.Future[Any]"]


class ScriptBatcher:
    """Runs ``script`` for many concurrent callers, one round trip per turn of the loop.

    :param client: the client to run it on.
    :param script: the script every call runs.
    :param max_batch: calls per round trip at most (a larger batch is split).
    """

    def __init__(self, client: Redis, script: Script, *, max_batch: int = 512) -> None:
        self._client = client
        self._script = script
        self._max_batch = max_batch
        self._queued: list[Call] = []
        self._flushing: set[asyncio.Task[None]] = set()
        # One reload at a time: ``Script.load`` learns from a failed load whether the
        # server takes the script's flags, which concurrent loads would confuse.
        self._loading = asyncio.Lock()
        #: Round trips made and calls sent, for tests and curious operators.
        self.batches = 0
        self.calls = 0

    async def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """The script's reply to this call (or its error, raised)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((keys, args, future))
        return await future

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), self._max_batch):
            task = asyncio.create_task(self._send(queued[start : start + self._max_batch]))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _send(self, calls: list[Call]) -> None:
        self.batches += 1
        self.calls += len(calls)
        try:
            replies = await self._round_trip(calls)
            if any(isinstance(reply, NoScriptError) for reply in replies):
                # Redis forgot the script (a restart, SCRIPT FLUSH): those calls did nothing.
                async with self._loading:
                    await self._script.load(self._client)
                again = [call for call, reply in zip(calls, replies, strict=True) if isinstance(reply, NoScriptError)]
                retried = iter(await self._round_trip(again))
                replies = [next(retried) if isinstance(reply, NoScriptError) else reply for reply in replies]
        except asyncio.CancelledError:
            for _keys, _args, future in calls:
                future.cancel()
            raise
        except Exception as exc:  # e.g. the connection failed: each call may or may not have run
            for _keys, _args, future in calls:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_keys, _args, future), reply in zip(calls, replies, strict=True):
            if future.done():  # its caller gave up (cancelled)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _round_trip(self, calls: list[Call]) -> list[Any]:
        return await round_trip(self._client, [self._script.command(keys, args) for keys, args, _future in calls])
