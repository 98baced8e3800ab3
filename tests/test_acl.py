"""Least privilege: the service runs under an ACL user limited to its namespace and
commands; a get_books user can only add requests and read events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from lending.client import submit, wait_for_event
from lending.keys import LENDING_GROUP, Keys
from lending.ops import monitoring, retention
from lending.ops.acl import sender_user_rules, worker_user_rules
from lending.ops.status import read_status
from lending.redis.connection import make_client
from lending.redis.consumer import ensure_group
from lending.redis.scripts import Scripts

from .conftest import StartWorker
from .support import run_command


def with_user(url: str, user: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}:{password}@{rest}"


@pytest.fixture
async def acl_users(redis: Redis, namespace: str) -> AsyncIterator[tuple[str, str, str]]:
    suffix = uuid.uuid4().hex[:8]
    worker, sender, password = f"lending-{suffix}", f"get-books-{suffix}", uuid.uuid4().hex
    await run_command(redis, "ACL", "SETUSER", worker, "reset", "on", f">{password}", *worker_user_rules(namespace))
    await run_command(redis, "ACL", "SETUSER", sender, "reset", "on", f">{password}", *sender_user_rules(namespace))
    yield worker, sender, password
    await redis.acl_deluser(worker, sender)


async def test_service_and_sender_under_least_privilege(
    redis: Redis, keys: Keys, redis_url: str, start_worker: StartWorker, acl_users: tuple[str, str, str]
) -> None:
    worker_user, sender_user, password = acl_users
    await start_worker(redis_url=with_user(redis_url, worker_user, password), metrics_port=None)
    sender = make_client(with_user(redis_url, sender_user, password))
    try:
        for action, expected in (("lend", "accepted"), ("lend", "denied"), ("return", "returned")):
            user = "ada" if action == "return" or expected == "accepted" else "bob"
            request_id, after = await submit(sender, keys, action, user, ["b1"])
            event = await wait_for_event(sender, keys, action, request_id, after, 10)
            assert event is not None and event.status == expected, event

        # The sender can neither read the library's state nor change it.
        with pytest.raises((NoPermissionError, ResponseError), match=r"(?i)no permissions"):
            await sender.hgetall(keys.lent_books)
        with pytest.raises((NoPermissionError, ResponseError), match=r"(?i)no permissions"):
            await sender.sadd(keys.storage, "stolen")
        with pytest.raises((NoPermissionError, ResponseError), match=r"(?i)no permissions"):
            await sender.xadd(keys.shelving_returns, {"book_ids": "b1"})
    finally:
        await sender.aclose()
    assert not await redis.sismember(keys.storage, "stolen")


async def test_service_user_can_trim_read_status_and_dead_letter(
    redis: Redis,
    keys: Keys,
    redis_url: str,
    namespace: str,
    start_worker: StartWorker,
    acl_users: tuple[str, str, str],
) -> None:
    worker_user, _, password = acl_users
    url = with_user(redis_url, worker_user, password)
    worker = await start_worker(redis_url=url, shelving_fail_rate=1.0, max_deliveries=1)
    entry = await submit(redis, keys, "lend", "ada", ["b1"])
    event = await wait_for_event(redis, keys, "lend", entry[0], entry[1], 10)
    assert event is not None and event.status == "failed", event
    client = make_client(url)
    try:
        await retention.trim(client, keys, events_maxlen=10)
        await monitoring.refresh(worker.metrics, client, keys)
        await read_status(client, namespace)
        assert await redis.xlen(keys.dead_letters) == 1
    finally:
        await client.aclose()


async def test_service_user_cannot_touch_another_namespace(
    redis: Redis, redis_url: str, acl_users: tuple[str, str, str]
) -> None:
    worker_user, _, password = acl_users
    client = make_client(with_user(redis_url, worker_user, password))
    try:
        with pytest.raises((NoPermissionError, ResponseError), match=r"(?i)no permissions"):
            await client.get("{other}:storage")
        with pytest.raises((NoPermissionError, ResponseError), match=r"(?i)no permissions"):
            await client.flushall()
    finally:
        await client.aclose()


async def test_service_user_can_remove_dead_consumers(
    redis: Redis, keys: Keys, acl_users: tuple[str, str, str], redis_url: str
) -> None:
    worker_user, _, password = acl_users
    await ensure_group(redis, keys.lend_requests, LENDING_GROUP)
    await redis.xgroup_createconsumer(keys.lend_requests, LENDING_GROUP, "gone")
    client = make_client(with_user(redis_url, worker_user, password))
    try:
        removed = await retention.forget_dead_consumers(client, Scripts().forget_consumers, keys)
    finally:
        await client.aclose()
    assert removed == {keys.lend_requests: ["gone"]}
