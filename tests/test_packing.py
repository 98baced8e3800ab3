"""Commands packed by hiredis: the same bytes redis-py's own packer sends, faster."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import DataError
from redis.typing import EncodableT

from lending.redis.connection import make_client
from lending.redis.packing import PackedConnection, PackedSSLConnection, PackedUnixConnection

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
    packed, plain = PackedConnection(), Connection()
    command = ("EVALSHA", *args)
    assert b"".join(packed.pack_command(*command)) == b"".join(plain.pack_command(*command))


@given(st.lists(st.lists(argument, min_size=1, max_size=5), min_size=1, max_size=5))
def test_commands_sent_together_are_packed_as_redis_py_packs_them(commands: list[list[Argument]]) -> None:
    packed, plain = PackedConnection(), Connection()
    batch = [("SET", *args) for args in commands]
    assert b"".join(packed.pack_commands(batch)) == b"".join(plain.pack_commands(batch))


def test_a_command_name_with_its_subcommand_is_split_and_views_are_sent_as_bytes() -> None:
    packed, plain = PackedConnection(), Connection()
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
        PackedConnection().pack_command("SET", "k", value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "packed"),
    [
        ("redis://127.0.0.1:6379", PackedConnection),
        ("rediss://127.0.0.1:6379", PackedSSLConnection),
        ("unix:///tmp/redis.sock", PackedUnixConnection),
    ],
)
def test_every_kind_of_client_connection_packs_with_hiredis(url: str, packed: type[Connection]) -> None:
    assert make_client(url).connection_pool.connection_class is packed


@pytest.mark.parametrize(
    ("query", "kind"),
    [("?encoding=latin-1", Connection), ("?encoding_errors=replace", Connection), ("?encoding=UTF8", PackedConnection)],
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
