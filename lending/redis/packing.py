"""Commands packed into Redis's protocol by hiredis, in C.

redis-py's synchronous client packs commands with ``hiredis.pack_command`` when hiredis
is installed; its asyncio client always packs them in Python, one argument at a time.
For the scripts' long argument lists that is the worker's largest cost in Python after
the system calls (a commit of five lends: 43 µs in Python, 4 µs in C). The connection
classes here pack as the synchronous client does; everything else is redis-py's.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

import hiredis
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError
from redis.typing import EncodableT


class _HiredisPacking(AbstractConnection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return [_packed(args)]

    def pack_commands(self, commands: Iterable[Iterable[EncodableT]]) -> list[bytes]:
        return [b"".join(_packed(tuple(command)) for command in commands)]


class PackedConnection(_HiredisPacking, Connection):
    """A TCP connection whose commands hiredis packs."""


class PackedSSLConnection(_HiredisPacking, SSLConnection):
    """A TLS connection whose commands hiredis packs."""


class PackedUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    """A Unix socket connection whose commands hiredis packs."""


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: PackedConnection,
    SSLConnection: PackedSSLConnection,
    UnixDomainSocketConnection: PackedUnixConnection,
}


def pack_with_hiredis(pool: ConnectionPool) -> None:
    """Make ``pool``'s new connections pack with hiredis. Left as it is when its
    connections encode text other than as strict UTF-8 (hiredis knows only that one)."""
    kwargs = pool.connection_kwargs
    encoding = codecs.lookup(str(kwargs.get("encoding", "utf-8"))).name
    if encoding != "utf-8" or kwargs.get("encoding_errors", "strict") != "strict":
        return
    pool.connection_class = _PACKED.get(pool.connection_class, pool.connection_class)


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
