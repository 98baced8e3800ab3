"""A consumer group's lag after a failover: Redis 7.0's replicas keep a stale
``entries-read`` (redis/redis#12898), so a promoted replica reports a lag on a stream its
group has read to the end. ``status`` and the metrics say 0 then."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from lending.keys import LENDING_GROUP, Keys
from lending.metrics import Metrics
from lending.ops import monitoring
from lending.ops.status import group_lag, read_group
from lending.redis.connection import make_client
from lending.redis.consumer import ensure_group

from .conftest import SystemRedis, system_redis_7
from .support import send, wait_until


@pytest.mark.parametrize(
    ("reported", "last_delivered", "last_generated", "lag"),
    [
        # XINFO GROUPS on a promoted 7.0 replica: entries-read 20, lag 30, everything read.
        (30, "1795691667132-0", "1795691667132-0", 0),
        (730, "1700000000123-5", "1700000000123-5", 0),
        # Read past the last entry left (the last ones were deleted): nothing to read.
        (2, "1700000000124-0", "1700000000123-9", 0),
        # Entries after the last delivered one: the reported lag stands.
        (3, "1700000000123-5", "1700000000123-6", 3),
        (3, "1700000000122-9", "1700000000123-0", 3),
        (0, "0-0", "0-0", 0),
    ],
)
def test_no_lag_once_the_group_read_up_to_the_last_id(
    reported: int, last_delivered: str, last_generated: str, lag: int
) -> None:
    assert group_lag(reported, last_delivered, last_generated) == lag


@pytest.fixture
async def master_and_replica(tmp_path: Path) -> AsyncIterator[tuple[Redis, Redis]]:
    """Two Redis 7 servers, not replicating yet (skipped without a Redis 7)."""
    binary = system_redis_7()
    if binary is None:
        pytest.skip("no Redis 7.x at /usr/bin/redis-server")
    servers = [SystemRedis(binary, tmp_path / name) for name in ("master", "replica")]
    clients: list[Redis] = []
    try:
        for server in servers:
            server.start()
            clients.append(make_client(server.url))
        await clients[0].config_set("repl-diskless-sync-delay", 0)
        yield clients[0], clients[1]
    finally:
        for client in clients:
            await client.aclose()
        for server in servers:
            server.stop()


async def test_a_promoted_redis_7_replica_shows_no_stale_lag(
    master_and_replica: tuple[Redis, Redis], keys: Keys
) -> None:
    master, replica = master_and_replica
    stream = keys.lend_requests
    await ensure_group(master, stream, LENDING_GROUP)
    for n in range(3):
        await send(master, keys, "lend", "ada", [f"b{n}"])
    await master.xreadgroup(LENDING_GROUP, "w1", {stream: ">"})
    # The replica gets the group with entries-read 3 in its full sync...
    port = master.connection_pool.connection_kwargs["port"]
    await replica.replicaof("127.0.0.1", port)

    async def in_sync() -> bool:
        return (await replica.info("replication")).get("master_link_status") == "up"

    await wait_until(in_sync, timeout_s=20)
    # ... and then only the reads' XCLAIMs, which leave entries-read at 3 on 7.0.
    for n in range(5):
        await send(master, keys, "lend", "bob", [f"c{n}"])
    await master.xreadgroup(LENDING_GROUP, "w1", {stream: ">"})
    assert await master.wait(1, 5_000) == 1
    await replica.replicaof("NO", "ONE")  # the failover

    info = next(g for g in await replica.xinfo_groups(stream) if g["name"] == LENDING_GROUP.encode())
    version = str((await replica.info("server"))["redis_version"])
    if version.startswith("7.0."):
        assert info["lag"] == 5, f"Redis {version} reported {info}: the stale lag was not reproduced"
    assert (await read_group(replica, stream, LENDING_GROUP, set()))["lag"] == 0
    metrics = Metrics()
    await monitoring.refresh(metrics, replica, keys)
    assert metrics.registry.get_sample_value("lending_stream_lag", {"stream": stream, "group": LENDING_GROUP}) == 0
