"""How commands go on the wire: packed by hiredis in C, sent without a task each, and on
the hot path several in one write, their replies read under one deadline.

redis-py's asyncio client spends more CPU on a command than Redis spends running it, and
three of its costs buy nothing here:

- **Packing.** Its synchronous client packs commands with ``hiredis.pack_command`` when
  hiredis is installed; its asyncio client packs them in Python, one argument at a time:
  for the scripts' long argument lists, 43 µs against 4 µs for a commit of five lends.
- **The send's timeout.** With a socket timeout set, it sends each command under
  ``asyncio.wait_for``, which (on Python 3.11) runs the send as a task of its own: about
  a third of a short command's CPU (a GET: 74 against 30 µs in all). The send can only
  wait when the transport holds more than its high-water mark (64 KiB) unsent. On a
  connection whose replies have all been read, everything sent before has reached Redis,
  so a command under 64 KiB goes to the transport's buffer and on, and never waits: it is
  sent without the timeout. Longer commands keep it.
- **A timeout per reply.** Each reply is read under an ``asyncio.timeout`` of its own.

The connection classes here (``LeanConnection`` and its TLS and Unix socket siblings)
answer the first two and leave everything else to redis-py, the reply's timeout too,
which is what notices a Redis that stopped answering. ``exchange`` answers the third:
it sends several commands in one write on a connection it holds, and reads their
replies under one deadline. The batch transaction's round trips, the API's batched
submissions and every script call go through it.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

Command = tuple[EncodableT, ...]

#: asyncio's and uvloop's default high-water mark of a transport's write buffer: below
#: it, a write never makes ``drain()`` wait.
WRITE_HIGH_WATER = 64 * 1024


class _Lean(AbstractConnection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return [_packed(args)]

    def pack_commands(self, commands: Iterable[Iterable[EncodableT]]) -> list[bytes]:
        return [b"".join(_packed(tuple(command)) for command in commands)]

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        timeout = self.socket_timeout
        # Connecting and the health check read replies: under the socket timeout.
        if not timeout or not self.is_connected or self.health_check_interval or not _short(command):
            await super().send_packed_command(command, check_health)
            return
        self.socket_timeout = None  # read by redis-py's send only, and only before it awaits
        try:
            await super().send_packed_command(command, check_health)
        finally:
            self.socket_timeout = timeout


class LeanConnection(_Lean, Connection):
    """A TCP connection whose commands hiredis packs, sent without a task each."""


class LeanSSLConnection(_Lean, SSLConnection):
    """A TLS connection whose commands hiredis packs, sent without a task each."""


class LeanUnixConnection(_Lean, UnixDomainSocketConnection):
    """A Unix socket connection whose commands hiredis packs, sent without a task each."""


_LEAN: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: LeanConnection,
    SSLConnection: LeanSSLConnection,
    UnixDomainSocketConnection: LeanUnixConnection,
}


def use_lean_connections(pool: ConnectionPool) -> None:
    """Make ``pool``'s new connections lean. Left as it is when its connections encode
    text other than as strict UTF-8 (hiredis packs only that)."""
    kwargs = pool.connection_kwargs
    encoding = codecs.lookup(str(kwargs.get("encoding", "utf-8"))).name
    if encoding != "utf-8" or kwargs.get("encoding_errors", "strict") != "strict":
        return
    pool.connection_class = _LEAN.get(pool.connection_class, pool.connection_class)


async def exchange(connection: AbstractConnection, commands: Sequence[Command]) -> list[Any]:
    """Send ``commands`` in one write and read every reply, all within the connection's
    socket timeout (off meanwhile: one deadline, not one per command and reply). An
    error reply is returned as redis-py's exception, not raised, so that none is left
    unread. Anything else that interrupts it (the deadline, a lost connection, a
    cancellation) closes the connection, with whatever it had not read.

    :raises redis.exceptions.TimeoutError: the replies did not all come in time (an
        outage, as redis-py's own socket timeout is).
    """
    timeout_s, connection.socket_timeout = connection.socket_timeout, None
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            await connection.send_packed_command(connection.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
    except BaseException as exc:
        await connection.disconnect(nowait=True)
        if deadline.expired():
            raise RedisTimeoutError(f"Redis did not answer within {timeout_s:g} s") from exc
        raise
    finally:
        connection.socket_timeout = timeout_s


async def round_trip(client: Redis, commands: Sequence[Command]) -> list[Any]:
    """``exchange`` on a connection of ``client``'s pool, held for it: every reply, raw (no
    response callback), an error reply as its exception."""
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        return await exchange(connection, commands)
    finally:
        await pool.release(connection)


async def call(client: Redis, *command: EncodableT) -> Any:
    """One command (``round_trip``): its reply, or its error reply raised."""
    (reply,) = await round_trip(client, [command])
    if isinstance(reply, Exception):
        raise reply
    return reply


def _short(command: bytes | str | Iterable[bytes]) -> bool:
    """A packed command (one piece of bytes, as ``_Lean`` packs) below ``WRITE_HIGH_WATER``."""
    if isinstance(command, list) and len(command) == 1:
        command = command[0]
    return isinstance(command, bytes) and len(command) < WRITE_HIGH_WATER


def _packed(args: tuple[EncodableT, ...]) -> bytes:
    # As redis-py does: a command name given with its subcommand ("CONFIG GET") is split.
    head = args[0]
    if isinstance(head, str):
        args = (*head.encode().split(), *args[1:])
    elif isinstance(head, bytes) and b" " in head:
        args = (*head.split(), *args[1:])
    try:
        packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    except TypeError:
        # hiredis takes bytes but no other buffer: copied (rare, so not looked for first).
        views = tuple(bytes(arg) if isinstance(arg, bytearray | memoryview) else arg for arg in args)
        try:
            packed = hiredis.pack_command(views)  # type: ignore[arg-type]
        except TypeError as exc:  # None, a bool, ...: redis-py's own error for them
            raise DataError(str(exc)) from exc
    return packed
