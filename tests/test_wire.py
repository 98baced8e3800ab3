"""Commands on the wire: packed by hiredis (the same bytes redis-py's own packer sends),
sent together, and read under one deadline that still catches a Redis gone silent."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from lending.redis.connection import make_client
from lending.redis.embedded import EmbeddedRedis, free_port
from lending.redis.wire import LeanConnection, LeanSSLConnection, LeanUnixConnection, call, exchange

# What callers pass to redis-py: text, bytes, integers, floats (memoryviews below).
Argument = str | bytes | int | float
argument = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=["Cs"])),
    st.binary(),
    st.integers(),
    st.floats(allow_nan=False),
)


@given(st.lists(argument, min_size=1, max_size=20))
def test_a_command_is_packed_as_redis_py_packs_it(args: list[Argument]) -> None:
    packed, plain = LeanConnection(), Connection()
    command = ("EVALSHA", *args)
    assert b"".join(packed.pack_command(*command)) == b"".join(plain.pack_command(*command))


@given(st.lists(st.lists(argument, min_size=1, max_size=5), min_size=1, max_size=5))
def test_commands_sent_together_are_packed_as_redis_py_packs_them(commands: list[list[Argument]]) -> None:
    packed, plain = LeanConnection(), Connection()
    batch = [("SET", *args) for args in commands]
    assert b"".join(packed.pack_commands(batch)) == b"".join(plain.pack_commands(batch))


def test_a_command_name_with_its_subcommand_is_split_and_views_are_sent_as_bytes() -> None:
    packed, plain = LeanConnection(), Connection()
    commands: list[tuple[EncodableT, ...]] = [
        ("CONFIG GET", "maxmemory"),
        (b"CLIENT SETNAME", b"w1"),
        ("SET", memoryview(b"k"), bytearray(b"v")),
    ]
    for command in commands:
        assert b"".join(packed.pack_command(*command)) == b"".join(plain.pack_command(*command))


@pytest.mark.parametrize("value", [None, True, object()])
def test_a_value_redis_cannot_take_is_refused_as_redis_py_refuses_it(value: object) -> None:
    with pytest.raises(DataError):
        LeanConnection().pack_command("SET", "k", value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "packed"),
    [
        ("redis://127.0.0.1:6379", LeanConnection),
        ("rediss://127.0.0.1:6379", LeanSSLConnection),
        ("unix:///tmp/redis.sock", LeanUnixConnection),
    ],
)
def test_every_kind_of_client_connection_packs_with_hiredis(url: str, packed: type[Connection]) -> None:
    assert make_client(url).connection_pool.connection_class is packed


@pytest.mark.parametrize(
    ("query", "kind"),
    [("?encoding=latin-1", Connection), ("?encoding_errors=replace", Connection), ("?encoding=UTF8", LeanConnection)],
)
def test_a_client_encoding_text_otherwise_than_as_strict_utf8_keeps_redis_py_packer(
    query: str, kind: type[Connection]
) -> None:
    assert make_client("redis://127.0.0.1:6379" + query).connection_pool.connection_class is kind


async def test_text_bytes_and_numbers_reach_redis_intact(redis_url: str) -> None:
    client = make_client(redis_url)
    try:
        values: list[EncodableT] = ["ada ✓", b"\x00\xff\r\n", 42, 2.5, ""]
        await client.rpush("packing:test", *values)
        assert await client.lrange("packing:test", 0, -1) == [b"ada \xe2\x9c\x93", b"\x00\xff\r\n", b"42", b"2.5", b""]
    finally:
        await client.delete("packing:test")
        await client.aclose()


# -- one deadline per round trip --------------------------------------------------------


@pytest.fixture
def frozen_redis(tmp_path: Path) -> Iterator[tuple[str, Callable[[int], None]]]:
    """A private Redis (its URL with a socket timeout of 0.3 s) and what freezes it
    (``SIGSTOP``) or thaws it (``SIGCONT``): frozen, it keeps its connections but answers
    nothing, and reads nothing in."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persistent=False)
    server.start()
    pid = server.pid
    assert pid is not None

    def signal_it(signal_number: int) -> None:
        os.kill(pid, signal_number)

    try:
        yield f"{server.url}/?socket_timeout=0.3", signal_it
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()


async def test_a_round_trip_reads_every_reply_and_hands_back_error_replies(redis_url: str, namespace: str) -> None:
    client = make_client(redis_url)
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    key = f"{namespace}:wire"
    try:
        replies = await exchange(connection, [("SET", key, "text"), ("INCR", key), ("GET", key)])
        assert replies[0] in (True, b"OK")
        assert isinstance(replies[1], ResponseError)
        assert replies[2] == b"text"
        # Nothing left unread: the next round trip gets its own replies.
        assert await exchange(connection, [("GET", key)]) == [b"text"]
        assert connection.is_connected
        assert connection.socket_timeout == 10.0  # off during a round trip only
    finally:
        await pool.release(connection)
        await client.delete(key)
        await client.aclose()


@pytest.mark.parametrize("how", ["round trip", "script call", "client command", "long command"])
async def test_a_redis_that_stops_answering_is_a_timeout_after_the_socket_timeout(
    frozen_redis: tuple[str, Callable[[int], None]], how: str
) -> None:
    url, signal_it = frozen_redis
    client = make_client(url)
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    await pool.release(connection)  # connected, and next in line
    signal_it(signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(RedisTimeoutError):
        if how == "round trip":
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await exchange(connection, [("GET", "a"), ("GET", "b")])
            finally:
                assert not connection.is_connected  # its replies would come to the next user
                await pool.release(connection)
        elif how == "script call":
            await call(client, "EVALSHA", "0" * 40, 0)
        elif how == "client command":
            await client.get("a")
        else:  # over the transport's high-water mark a send may wait: it keeps its timeout
            await client.set("a", b"x" * (64 << 20))
    assert time.monotonic() - started < 5
    # A connection closed with data still unsent (redis-py's, after its send timed out)
    # closes its socket once the data is out: thawed, Redis takes it.
    signal_it(signal.SIGCONT)
    await asyncio.sleep(0.5 if how == "long command" else 0)
    await client.aclose()


async def test_a_cancelled_round_trip_closes_its_connection(redis_url: str, namespace: str) -> None:
    client = make_client(redis_url)
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        # A read that waits (longer than the socket timeout would allow, and no timeout).
        task = asyncio.create_task(exchange(connection, [("BLPOP", f"{namespace}:nothing", 0)]))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not connection.is_connected  # its reply would come to the next user
        assert connection.socket_timeout == 10.0
    finally:
        await pool.release(connection)
        await client.aclose()
