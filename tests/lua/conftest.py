"""Fixtures and helpers shared by the script tests.

Each test calls a script with literal keys of its own namespace, then checks the
resulting Redis state. Entries are made pending with a real XREADGROUP, so the scripts'
ownership checks see what a worker would.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pprint import pformat
from typing import TypeVar

import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ResponseError

from lending.domain.streamids import MAX_ID
from lending.keys import LENDING_GROUP, Keys
from lending.redis.connection import make_client
from lending.redis.consumer import ensure_group
from lending.redis.scripts import Scripts

from ..support import decoded, hash_of, members, raw_streams, stream_entries, xadd_fields

T = TypeVar("T")

# The commands the scripts write with; any other command they run only reads.
WRITES = frozenset(
    {
        "XADD",
        "XACK",
        "XCLAIM",
        "XDEL",
        "HSET",
        "HDEL",
        "SADD",
        "SREM",
        "SMOVE",
        "DEL",
        "INCRBY",
        "SET",
        "PEXPIRE",
        "LTRIM",
    }
)


@pytest.fixture
def scripts() -> Scripts:
    """Fresh per test: a ``Script`` learns whether the server takes its shebang."""
    return Scripts()


# -- replies (the general readers are in tests/support.py) ---------------------------------


async def stream_items(redis: Redis, stream: str) -> list[list[tuple[str, str]]]:
    """Entries as ordered (field, value) lists, to check field order too."""
    return [list(fields.items()) for _, fields in await stream_entries(redis, stream)]


async def stream_fields(redis: Redis, stream: str) -> list[dict[str, str]]:
    return [fields for _, fields in await stream_entries(redis, stream)]


def returned_books(entries: list[dict[str, str]]) -> list[str]:
    """The books of ``{NS}:shelving:returns`` entries, in order."""
    return [book for entry in entries for book in entry["book_ids"].split(",")]


def contexts_of(entry: dict[str, str]) -> dict[str, str]:
    """book -> context of one ``{NS}:shelving:returns`` entry."""
    return dict(zip(entry["book_ids"].split(","), entry["context_ids"].split(","), strict=True))


# -- stream entries in each state ----------------------------------------------------------


async def pending_entry(
    redis: Redis,
    stream: str,
    group: str = LENDING_GROUP,
    *,
    consumer: str = "c1",
    entry_id: str = "*",
    **fields: str,
) -> str:
    """Add an entry to ``stream`` and deliver it to ``consumer``: it is now pending there."""
    await ensure_group(redis, stream, group)
    values: dict[str, str] = fields or {"user_id": "ada", "book_ids": "b1"}
    entry = decoded(await redis.xadd(stream, xadd_fields(values), id=entry_id))
    reply = raw_streams(await redis.xreadgroup(group, consumer, {stream: ">"}, count=1))
    assert reply[0][1][0][0] == entry
    return entry


async def finished_entry(redis: Redis, stream: str, group: str = LENDING_GROUP, *, entry_id: str = "*") -> str:
    """An entry delivered and acknowledged: finished by someone else."""
    entry = await pending_entry(redis, stream, group, entry_id=entry_id)
    assert await redis.xack(stream, group, entry) == 1
    return entry


async def undelivered_entry(redis: Redis, stream: str) -> str:
    """An entry in the stream that no consumer has read yet."""
    await ensure_group(redis, stream, LENDING_GROUP)
    return decoded(await redis.xadd(stream, {"user_id": "ada", "book_ids": "b1"}))


async def is_pending(redis: Redis, stream: str, entry: str, group: str = LENDING_GROUP) -> bool:
    return bool(await redis.xpending_range(stream, group, min=entry, max=entry, count=1))


async def pending_on(redis: Redis, stream: str, entry: str, group: str = LENDING_GROUP) -> str | None:
    """The consumer of ``group`` that ``entry`` is pending on, or None."""
    rows = await redis.xpending_range(stream, group, min=entry, max=entry, count=1)
    return decoded(rows[0]["consumer"]) if rows else None


# -- failure setups ------------------------------------------------------------------------


async def fill_stream(redis: Redis, stream: str) -> None:
    """Make ``stream`` take no more entries: its last generated ID is the largest there
    is (as if a client had added it), and the entry itself is gone again."""
    await redis.xadd(stream, {"f": "v"}, id=MAX_ID)
    await redis.xdel(stream, MAX_ID)


@contextlib.asynccontextmanager
async def out_of_memory(redis: Redis) -> AsyncIterator[None]:
    """Redis at its memory limit with ``noeviction``, restored afterwards."""
    saved = await redis.config_get("maxmemory*")
    try:
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", 1)
        yield
    finally:
        await redis.config_set("maxmemory", decoded(saved["maxmemory"]))
        await redis.config_set("maxmemory-policy", decoded(saved["maxmemory-policy"]))


def is_oom(error: ResponseError) -> bool:
    """Redis refused for want of memory: before the script ran (Redis 7, redis-py's
    ``OutOfMemoryError``) or at its first write (Redis 6.2, inside the script's error)."""
    return isinstance(error, OutOfMemoryError) or "OOM command not allowed" in str(error)


# -- observing Redis -----------------------------------------------------------------------


Snapshot = dict[str, tuple[str, object, bool]]


async def snapshot(redis: Redis, keys: Keys) -> Snapshot:
    """Every key of the namespace: its type, its full value and whether it expires.
    Streams with their entries, last ID, groups, consumers and pending entries (without
    idle times, which change by themselves)."""
    out: Snapshot = {}
    async for raw in redis.scan_iter(match=keys.prefix + ":*", count=1000):
        key = decoded(raw)
        kind = decoded(await redis.type(key))
        value: object
        if kind == "string":
            value = decoded(await redis.get(key))
        elif kind == "hash":
            value = await hash_of(redis, key)
        elif kind == "set":
            value = await members(redis, key)
        elif kind == "stream":
            value = await _stream_state(redis, key)
        else:
            value = await redis.dump(key)
        out[key] = (kind, value, await redis.pttl(key) > 0)
    return out


async def assert_unchanged(redis: Redis, keys: Keys, before: Snapshot) -> None:
    """Nothing in the namespace changed since ``before``: else, each changed key as
    (before, after), None for a key missing on that side."""
    after = await snapshot(redis, keys)
    changed = {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    }
    assert not changed, "changed:\n" + pformat(changed, width=110)


async def _stream_state(redis: Redis, stream: str) -> dict[str, object]:
    info = await redis.xinfo_stream(stream)
    groups: dict[str, object] = {}
    for group in await redis.xinfo_groups(stream):
        name = decoded(group["name"])
        consumers = await redis.xinfo_consumers(stream, name)
        pel = await redis.xpending_range(stream, name, min="-", max="+", count=1_000_000)
        groups[name] = {
            "last-delivered-id": decoded(group["last-delivered-id"]),
            "consumers": {decoded(c["name"]): c["pending"] for c in consumers},
            "pending": [(decoded(p["message_id"]), decoded(p["consumer"]), p["times_delivered"]) for p in pel],
        }
    return {
        "entries": await stream_items(redis, stream),
        "last-generated-id": decoded(info["last-generated-id"]),
        "groups": groups,
    }


@dataclass(frozen=True)
class Command:
    """One command Redis ran, as MONITOR shows it."""

    by_script: bool
    text: str

    @property
    def name(self) -> str:
        return self.text.split(" ", 1)[0].upper()

    @property
    def writes(self) -> bool:
        return self.name in WRITES


async def _monitor(
    redis: Redis, keys: Keys, step: Callable[[], Awaitable[T]]
) -> tuple[T | ResponseError, list[Command]]:
    done = f"{keys.prefix}:monitor-done"
    commands: list[Command] = []
    outcome: T | ResponseError
    async with redis.monitor() as monitor:
        try:
            outcome = await step()
        except ResponseError as exc:
            outcome = exc
        await redis.exists(done)
        while (info := await monitor.next_command())["command"] != f"EXISTS {done}":
            if keys.prefix in info["command"]:
                commands.append(Command(info["client_type"] == "lua", info["command"]))
    return outcome, commands


async def monitored(redis: Redis, keys: Keys, step: Callable[[], Awaitable[T]]) -> tuple[T, list[Command]]:
    """Run ``step()`` under MONITOR: its result, and the commands Redis ran meanwhile on
    this test's keys (those the scripts ran included), in order."""
    outcome, commands = await _monitor(redis, keys, step)
    if isinstance(outcome, ResponseError):
        raise outcome
    return outcome, commands


async def monitored_error(
    redis: Redis, keys: Keys, step: Callable[[], Awaitable[object]]
) -> tuple[ResponseError, list[Command]]:
    """Like ``monitored`` for a ``step()`` that Redis must refuse: its error, and the
    commands that ran."""
    outcome, commands = await _monitor(redis, keys, step)
    assert isinstance(outcome, ResponseError), f"no error: {outcome!r}"
    return outcome, commands


def script_commands(commands: list[Command]) -> list[Command]:
    return [c for c in commands if c.by_script]


def assert_reads_then_writes(commands: list[Command], first_write: str) -> None:
    """The script read and checked everything before its first write, ``first_write``
    (a command name and its key, e.g. ``XADD {NS}:events``)."""
    ran = script_commands(commands)
    assert ran, "the script ran no command"
    writes = [k for k, c in enumerate(ran) if c.writes]
    assert writes, "the script wrote nothing"
    assert ran[writes[0]].text.startswith(first_write + " "), [c.text for c in ran]
    assert all(c.writes for c in ran[writes[0] :]), [c.text for c in ran]


@pytest.fixture(params=["default", "redis7"])
async def each_server(request: pytest.FixtureRequest, redis: Redis, keys: Keys) -> AsyncIterator[Redis]:
    """A client of the default test server (the embedded Redis 6.2 unless ``REDIS_URL``
    says otherwise), then of a private Redis 7: scripts must behave the same on both."""
    if request.param == "default":
        yield redis
        return
    client = make_client(request.getfixturevalue("redis7_url"))
    try:
        yield client
    finally:
        async for key in client.scan_iter(match=keys.prefix + ":*", count=1000):
            await client.delete(key)
        await client.aclose()


async def server_major(redis: Redis) -> int:
    info = await redis.info("server")
    return int(str(info["redis_version"]).split(".")[0])
