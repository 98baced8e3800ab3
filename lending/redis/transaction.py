"""A batch's optimistic transaction on one connection, in two writes.

The lending service WATCHes the counts of a batch's users, reads them with a script and
commits with MULTI, a script and EXEC. redis-py's ``Pipeline`` sends WATCH on its own
and waits for its answer: four round trips per batch instead of three (the shelving call
is the third). Here WATCH goes out in the same write as the script that reads (Redis
runs a connection's commands in order, so every read of the script is watched), and
MULTI, the commit and EXEC in a second write. Nothing else changes: a watched key written by anyone
before the EXEC aborts the commit (``WatchError``), and the caller decides again. (As
with redis-py's ``Pipeline``, the three go out together: should Redis refuse MULTI, for
an ACL without it, the script would run on its own. A worker checks at start that its
user may run them: ``probe``.)

A connection is returned to the pool clean: no WATCH left on it (UNWATCH), and no reply
left unread (a round trip that did not read them all closed it, so that the pool opens
a fresh one). Each round trip's replies come within one deadline, the socket timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import WatchError

from lending.redis.scripts import Arg, Script
from lending.redis.wire import Command, exchange


class Transaction:
    """``async with Transaction(client) as tx``: ``await tx.watch_and_run(...)``, then
    ``await tx.commit(...)``; both raise Redis's error replies as redis-py would.

    :param client: its pool lends the connection for the transaction's lifetime.
    """

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool
        self._connection: AbstractConnection | None = None
        self._watching = False

    async def __aenter__(self) -> Transaction:
        self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection = self._held()
        self._connection = None
        try:
            if self._watching and exc_type is asyncio.CancelledError:
                await connection.disconnect(nowait=True)  # a cancelled task waits for nothing
            elif self._watching and connection.is_connected:
                await self._unwatch(connection)
        finally:
            await self._pool.release(connection)

    async def watch_and_run(
        self, watched: Sequence[str], script: Script, keys: Sequence[str], args: Sequence[Arg]
    ) -> Any:
        """WATCH ``watched``, then run ``script``: one write, one round trip; its reply."""
        self._watching = True
        watch, reply = await self._round_trip(("WATCH", *watched), script.command(keys, args))
        _raised(watch)
        return _raised(reply)

    async def commit(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """MULTI, ``script``, EXEC: one write, one round trip; the script's reply.

        :raises WatchError: a watched key changed since WATCH, or this process closed the
            connection since (its WATCH with it): nothing was run. (A connection Redis
            closed raises redis-py's ``ConnectionError``: an outage, as any other.)
        """
        if self._watching and not self._held().is_connected:
            # redis-py would reconnect silently, and the commit would run unwatched.
            raise WatchError("the connection closed after WATCH: the transaction did not run")
        multi, queued, executed = await self._round_trip(("MULTI",), script.command(keys, args), ("EXEC",))
        if not isinstance(multi, Exception):
            self._watching = False  # EXEC, run or aborted, ended the transaction and its WATCH
        _raised(multi)
        _raised(queued)
        if _raised(executed) is None:
            raise WatchError("a watched key changed: the transaction did not run")
        (reply,) = executed
        return _raised(reply)

    async def probe(self, key: str) -> None:
        """WATCH ``key``, an empty MULTI/EXEC, UNWATCH: one round trip that changes nothing,
        and raises the first refusal. Run at a worker's start: with MULTI refused (an ACL
        without it), every commit would run on its own, unwatched."""
        self._watching = True
        replies = await self._round_trip(("WATCH", key), ("MULTI",), ("EXEC",), ("UNWATCH",))
        for reply in replies:
            _raised(reply)
        self._watching = False

    async def _round_trip(self, *commands: Command) -> list[Any]:
        """Send ``commands`` in one write and read every reply (``wire.exchange``: an error
        reply is returned, not raised; an interrupted round trip closes the connection)."""
        return await exchange(self._held(), commands)

    async def _unwatch(self, connection: AbstractConnection) -> None:
        """UNWATCH before the connection goes back to the pool; close it if that fails
        (the caller's own error, if any, is the one that matters)."""
        try:
            await connection.send_command("UNWATCH")
            await connection.read_response()
        except BaseException as exc:
            await connection.disconnect(nowait=True)
            if not isinstance(exc, Exception):  # a cancellation goes on
                raise

    def _held(self) -> AbstractConnection:
        if self._connection is None:
            raise RuntimeError("Transaction used outside its async with block")
        return self._connection


def _raised(reply: Any) -> Any:
    """``reply``, or raised if it is an error."""
    if isinstance(reply, Exception):
        raise reply
    return reply
