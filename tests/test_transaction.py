"""The batch's optimistic transaction (``lending.redis.transaction``): WATCH goes out with
the reading script, MULTI + script + EXEC with the commit, and the connection always
goes back to the pool clean."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError, WatchError

from lending.keys import Keys
from lending.redis.connection import make_client
from lending.redis.replies import is_refusal
from lending.redis.scripts import Script
from lending.redis.transaction import Transaction
from lending.settings import Settings
from lending.worker import Worker

READ = Script("read", "return redis.call('GET', KEYS[1])")
WRITE = Script("write", "redis.call('SET', KEYS[1], ARGV[1]) return 'written'")
FAIL = Script("fail", "return redis.error_reply('NOPE the script says no')")
# Busy for ARGV[1] ms: long enough to cancel its caller while the reply is on its way.
SLOW = Script(
    "slow",
    "local t = redis.call('TIME') local until_us = (t[1] * 1e6 + t[2]) + ARGV[1] * 1000 "
    "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= until_us return 'slow'",
)


@pytest.fixture
async def one_connection(redis_url: str, redis: Redis) -> AsyncIterator[Redis]:
    """A client whose pool has one connection: what a transaction leaves on it, the next
    user meets. (``redis`` cleans the namespace up afterwards.)"""
    client = make_client(redis_url, max_connections=1)
    for script in (READ, WRITE, FAIL, SLOW):
        await script.load(client)
    yield client
    await client.aclose()


@pytest.fixture
async def acl_user(redis_url: str, redis: Redis, namespace: str) -> AsyncIterator[tuple[str, str]]:
    """An ACL user that may run everything (the test takes commands away) and its URL."""
    user = f"tx-{namespace}"
    await redis.acl_setuser(
        user, enabled=True, reset=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all"]
    )
    yield user, redis_url.replace("redis://", f"redis://{user}:pw@")
    await redis.acl_deluser(user)


async def without(redis: Redis, user: str, url: str, command: str) -> Redis:
    """A one-connection client of ``user``, who may not run ``command`` (an operator's
    mistake: the consumer treats the refusal as one, and the entries wait)."""
    await redis.acl_setuser(user, enabled=True, commands=[f"-{command}"])
    client = make_client(url, max_connections=1)
    for script in (READ, WRITE):
        await script.load(client)
    return client


async def test_a_commit_runs_when_no_watched_key_changed(one_connection: Redis, keys: Keys) -> None:
    watched, target = keys.user_count("ada"), keys.user_count("bob")
    await one_connection.set(watched, 1)
    async with Transaction(one_connection) as tx:
        assert await tx.watch_and_run([watched], READ, [watched], []) == b"1"
        assert await tx.commit(WRITE, [target], ["v"]) == b"written"
    assert await one_connection.get(target) == b"v"


async def test_a_watched_key_written_before_the_commit_aborts_it(
    one_connection: Redis, redis: Redis, keys: Keys
) -> None:
    watched, target = keys.user_count("ada"), keys.user_count("bob")
    async with Transaction(one_connection) as tx:
        assert await tx.watch_and_run([watched], READ, [watched], []) is None
        await redis.incr(watched)  # another worker's commit
        with pytest.raises(WatchError):
            await tx.commit(WRITE, [target], ["v"])
    assert await redis.exists(target) == 0


async def test_a_watch_never_outlives_its_transaction(one_connection: Redis, redis: Redis, keys: Keys) -> None:
    # The batch failed after reading (e.g. shelving did not answer): its WATCH must not
    # abort whatever the pool's connection runs next.
    watched, target = keys.user_count("ada"), keys.user_count("bob")
    with pytest.raises(LookupError):
        async with Transaction(one_connection) as tx:
            await tx.watch_and_run([watched], READ, [watched], [])
            raise LookupError("shelving did not answer")
    await redis.incr(watched)

    async with one_connection.pipeline(transaction=True) as pipe:
        pipe.set(target, "v")
        assert await pipe.execute() == [True]
    assert await one_connection.get(target) == b"v"


async def test_error_replies_are_raised_and_the_connection_stays_in_step(one_connection: Redis, keys: Keys) -> None:
    watched, target = keys.user_count("ada"), keys.user_count("bob")
    async with Transaction(one_connection) as tx:
        with pytest.raises(ResponseError, match="NOPE the script says no"):
            await tx.watch_and_run([watched], FAIL, [watched], [])
    async with Transaction(one_connection) as tx:
        await tx.watch_and_run([watched], READ, [watched], [])
        with pytest.raises(ResponseError, match="NOPE the script says no"):
            await tx.commit(FAIL, [target], [])
    # Every reply of both was read: the next command gets its own.
    assert await one_connection.set(target, "after") is True
    assert await one_connection.get(target) == b"after"


async def test_a_script_redis_forgot_raises_noscript_before_and_inside_exec(one_connection: Redis, keys: Keys) -> None:
    unknown = Script("unknown", "return 'never loaded'")
    watched, target = keys.user_count("ada"), keys.user_count("bob")
    async with Transaction(one_connection) as tx:
        with pytest.raises(NoScriptError):
            await tx.watch_and_run([watched], unknown, [watched], [])
    async with Transaction(one_connection) as tx:
        await tx.watch_and_run([watched], READ, [watched], [])
        with pytest.raises(NoScriptError):
            await tx.commit(unknown, [target], [])
    assert await one_connection.exists(target) == 0


async def test_a_cancelled_transaction_leaves_no_reply_for_the_next_user(one_connection: Redis, keys: Keys) -> None:
    watched, target = keys.user_count("ada"), keys.user_count("bob")

    async def slow_read() -> None:
        async with Transaction(one_connection) as tx:
            await tx.watch_and_run([watched], SLOW, [watched], [200])

    task = asyncio.create_task(slow_read())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The slow script's reply is still on its way to the old connection: the pool's
    # next command runs on a fresh one and reads its own reply.
    await one_connection.set(target, "fresh")
    assert await one_connection.get(target) == b"fresh"


async def test_a_connection_closed_after_watch_never_commits_unwatched(
    one_connection: Redis, redis: Redis, keys: Keys
) -> None:
    # E.g. the client closed at shutdown while a batch waited for shelving: redis-py
    # would open a new connection for the commit, without the WATCH.
    watched, target = keys.user_count("ada"), keys.user_count("bob")
    async with Transaction(one_connection) as tx:
        await tx.watch_and_run([watched], READ, [watched], [])
        await one_connection.connection_pool.disconnect()
        await redis.incr(watched)
        with pytest.raises(WatchError):
            await tx.commit(WRITE, [target], ["v"])
    assert await redis.exists(target) == 0


async def test_an_error_reply_before_others_leaves_the_connection_in_step(
    acl_user: tuple[str, str], redis: Redis, keys: Keys
) -> None:
    # WATCH refused, the script's reply behind it: both are read.
    client = await without(redis, *acl_user, "watch")
    watched = keys.user_count("ada")
    await redis.set(watched, 7)
    async with Transaction(client) as tx:
        with pytest.raises(NoPermissionError):
            await tx.watch_and_run([watched], READ, [watched], [])
    assert await client.get(watched) == b"7"
    await client.aclose()


async def test_a_refused_multi_leaves_no_watch_on_the_pooled_connection(
    acl_user: tuple[str, str], redis: Redis, keys: Keys
) -> None:
    user, url = acl_user
    client = await without(redis, user, url, "multi")
    watched, target, other = keys.user_count("ada"), keys.user_count("bob"), keys.user_count("cy")
    async with Transaction(client) as tx:
        await tx.watch_and_run([watched], READ, [watched], [])
        with pytest.raises(NoPermissionError) as refused:
            await tx.commit(WRITE, [target], ["v"])
    assert is_refusal(refused.value)  # entries wait, uncharged, for the ACL to be fixed
    await redis.acl_setuser(user, enabled=True, commands=["+multi"])
    await redis.incr(watched)  # another worker's later commit
    # The connection's next user watches nothing: its transaction runs.
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(other, "v")
        assert await pipe.execute() == [True], "the earlier batch's WATCH aborted it"
    await client.aclose()


async def test_a_refused_exec_is_a_refusal_and_commits_nothing(
    acl_user: tuple[str, str], redis: Redis, keys: Keys
) -> None:
    client = await without(redis, *acl_user, "exec")
    watched, target = keys.user_count("ada"), keys.user_count("bob")
    async with Transaction(client) as tx:
        await tx.watch_and_run([watched], READ, [watched], [])
        with pytest.raises(ResponseError) as refused:  # EXECABORT ... because of: NOPERM ...
            await tx.commit(WRITE, [target], ["v"])
    assert is_refusal(refused.value), "a refused EXEC was charged to the entries"
    assert await redis.exists(target) == 0
    await client.aclose()


@pytest.mark.parametrize("command", ["watch", "multi", "exec"])
async def test_a_worker_whose_user_may_not_run_the_transaction_refuses_to_start(
    acl_user: tuple[str, str], redis: Redis, keys: Keys, settings: Settings, command: str
) -> None:
    # Without MULTI every commit would run on its own, its WATCH ignored.
    client = await without(redis, *acl_user, command)
    worker = Worker(settings, client, handle_signals=False)
    with pytest.raises(ResponseError, match=f"'{command}'"):
        await asyncio.wait_for(worker.run(), 10)
    assert await redis.exists(keys.worker(settings.worker_id)) == 0, "it claimed its id first"
    await client.aclose()
